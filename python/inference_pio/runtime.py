"""Facts about the library and machine: threads, SIMD level, GPUs."""
from ._lib import check, ffi, lib

SIMD_LEVELS = {lib.TO_SIMD_SCALAR: "scalar", lib.TO_SIMD_AVX2: "avx2", lib.TO_SIMD_AVX512: "avx512"}


def num_threads():
    return lib.to_num_threads()


def set_num_threads(n):
    """Resize the library's thread pool (default: the CPUs this process may run on, or
    INFERENCE_PIO_THREADS)."""
    check(lib.to_set_num_threads(int(n)))


def simd_level(detected=False):
    """The vector instruction set the CPU kernels use ('scalar', 'avx2', 'avx512')."""
    return SIMD_LEVELS[lib.to_simd_detected() if detected else lib.to_simd_active()]


def set_simd_level(name):
    """Force a lower level, e.g. 'scalar' to exercise the portable path."""
    codes = {v: k for k, v in SIMD_LEVELS.items()}
    if name not in codes:
        raise ValueError(f"unknown SIMD level {name!r}; expected one of {list(codes)}")
    check(lib.to_set_simd(codes[name]))


def cuda_device_count():
    """GPUs visible to this build (0 when it was built without CUDA or no driver is present)."""
    out = ffi.new("int *")
    check(lib.to_cuda_device_count(out))
    return out[0]


def cuda_available():
    return bool(lib.to_cuda_available()) and cuda_device_count() > 0
