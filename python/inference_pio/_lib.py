"""The compiled library and its errors: `ffi`, `lib`, and `check(status)` that turns a failed
call into a Python exception carrying the library's message."""
from ._tensor_ops import ffi, lib


class TensorOpsError(RuntimeError):
    """A libtensor_ops call failed; the message is the library's own."""


class InvalidArgumentError(TensorOpsError, ValueError):
    pass


class DTypeError(TensorOpsError, TypeError):
    pass


class ShapeError(TensorOpsError, ValueError):
    pass


class BoundsError(TensorOpsError, IndexError):
    pass


class DeviceError(TensorOpsError):
    pass


class OutOfMemoryError(TensorOpsError, MemoryError):
    pass


class UnsupportedError(TensorOpsError, NotImplementedError):
    pass


class CudaError(TensorOpsError):
    pass


_ERRORS = {
    lib.TO_ERR_INVALID_ARGUMENT: InvalidArgumentError,
    lib.TO_ERR_DTYPE: DTypeError,
    lib.TO_ERR_SHAPE: ShapeError,
    lib.TO_ERR_BOUNDS: BoundsError,
    lib.TO_ERR_DEVICE: DeviceError,
    lib.TO_ERR_OUT_OF_MEMORY: OutOfMemoryError,
    lib.TO_ERR_UNSUPPORTED: UnsupportedError,
    lib.TO_ERR_CUDA: CudaError,
}


def check(status):
    if status != 0:
        message = ffi.string(lib.to_last_error()).decode("utf-8", "replace")
        raise _ERRORS.get(status, TensorOpsError)(message)
