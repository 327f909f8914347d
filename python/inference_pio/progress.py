"""A one-line progress bar on stderr (drawn only where stderr is a terminal, unless forced)."""
import sys
import time


class ProgressBar:
    def __init__(self, total, desc, unit="B", enabled=None, stream=None):
        self.total, self.desc, self.unit = max(total, 1), desc, unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done, self.start, self._last = 0, time.perf_counter(), 0.0

    def update(self, n):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now):
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        size = f"{self.done / 2**20:.0f}/{self.total / 2**20:.0f} MiB" if self.unit == "B" else f"{self.done}/{self.total}"
        self.stream.write(f"\r{self.desc} [{bar:<30}] {frac:4.0%} {size} {now - self.start:.1f}s")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
