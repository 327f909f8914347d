"""OpGraph: the library calls of one forward, recorded once and replayed.

A small model's decode step is hundreds of short library calls; the Python around each call
(allocating outputs, building views and descriptors) can cost as much as the call itself.
Capturing runs the forward once as usual while recording each compute call with its argument
descriptors; replaying makes the same calls again with nothing else in between. Like a CUDA
graph it replays on the same buffers: the inputs must be rewritten in place between replays
(engine/batch.py does that for the batch metadata), the outputs land in the same tensors, and
the shapes cannot change (one graph per batch size).
"""
import importlib

from . import _lib, ops
from ._lib import check

# The module (the package's own `tensor` attribute is the tensor() function).
tensor = importlib.import_module(".tensor", __package__)

# Calls that manage memory or report state, not compute: they run during capture but are not
# part of the replayed step (the memory they hand out stays owned by the graph).
_NOT_RECORDED = {"to_alloc", "to_free", "to_last_error", "to_status_name", "to_dtype_name",
                 "to_dtype_size", "to_num_threads", "to_simd_active", "to_readback_start",
                 "to_readback_wait", "to_readback_release"}


_CALLERS = (ops, tensor)  # the modules that call the library on a forward's behalf


class _RecordingLib:
    """Stands in for the cffi lib inside ops while capturing."""

    def __init__(self, lib, calls):
        self._lib, self._calls = lib, calls

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if name in _NOT_RECORDED or not callable(fn) or not name.startswith("to_"):
            return fn

        def record(*args):
            self._calls.append((fn, args))
            return fn(*args)
        return record


class OpGraph:
    def __init__(self, calls, tensors, output):
        self._calls, self._tensors, self.output = calls, tensors, output

    @classmethod
    def capture(cls, fn):
        """Runs fn() (a forward made of `ops` calls) and records its library calls; returns the
        graph, whose `output` is what fn returned."""
        if tensor._graph_tensors is not None:
            raise RuntimeError("OpGraph captures do not nest")
        calls, tensors = [], []
        tensor._graph_tensors = tensors
        recorder = _RecordingLib(_lib.lib, calls)
        for module in _CALLERS:
            module.lib = recorder
        try:
            output = fn()
        finally:
            for module in _CALLERS:
                module.lib = _lib.lib
            tensor._graph_tensors = None
        return cls(calls, tensors, output)

    def replay(self):
        """Makes the recorded calls again; returns the (rewritten) output."""
        for fn, args in self._calls:
            status = fn(*args)
            if status:
                check(status)
        return self.output

    def __len__(self):
        return len(self._calls)


class CudaGraph:
    """The GPU work of one forward recorded as a CUDA graph and replayed with one launch: what
    OpGraph does for the CPU, without even the Python loop. The same contract: inputs rewritten
    in place between replays, outputs in the same tensors, one graph per shape. Recording runs
    no kernel, so the output holds its values only after the first replay(). Every tensor the
    forward touches is kept alive with the graph; the forward must not copy to or from the host."""

    def __init__(self, handle, tensors, output):
        self._handle, self._tensors, self.output = handle, tensors, output

    @classmethod
    def capture(cls, fn, device_index=0):
        if tensor._graph_tensors is not None:
            raise RuntimeError("graph captures do not nest")
        tensors = []
        check(_lib.lib.to_cuda_graph_begin(device_index))
        handle = _lib.ffi.new("void **")
        tensor._graph_tensors = tensors
        try:
            output = fn()
        except BaseException:
            _lib.lib.to_cuda_graph_end(device_index, handle)  # ends the recording; its error is fn's
            _lib.lib.to_cuda_graph_destroy(handle[0])
            raise
        finally:
            tensor._graph_tensors = None
        check(_lib.lib.to_cuda_graph_end(device_index, handle))
        return cls(handle[0], tensors, output)

    def replay(self):
        check(_lib.lib.to_cuda_graph_launch(self._handle))
        return self.output

    def __del__(self):
        if self._handle is not None:
            _lib.lib.to_cuda_graph_destroy(self._handle)
            self._handle = None
