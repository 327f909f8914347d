"""Compiles tests/c/test_api.c against libtensor_ops (the installed one, or --lib PATH) with only
the public header, and runs it. Exit status is the test program's."""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lib", help="libtensor_ops.so to test (default: the installed package's)")
    p.add_argument("--sanitize", action="store_true", help="build the test with ASan + UBSan too")
    a = p.parse_args()
    if a.lib:
        lib = Path(a.lib).resolve()
    else:
        import inference_pio
        lib = Path(inference_pio.__file__).parent / "libtensor_ops.so"
    sanitize = ["-fsanitize=address,undefined"] if a.sanitize else []
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "test_api"
        subprocess.run(["gcc", "-std=gnu11", "-O1", "-g", *sanitize, "-I", str(ROOT / "csrc" / "include"),
                        str(ROOT / "tests" / "c" / "test_api.c"), str(lib), f"-Wl,-rpath,{lib.parent}",
                        "-lm", "-pthread", "-o", str(exe)], check=True)
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1")
        return subprocess.run([str(exe)], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
