"""Library facts: threads, SIMD selection, GPU discovery, errors as exceptions."""
import os
import subprocess
import sys

import pytest

import inference_pio as ip
from inference_pio import runtime


def _run(code, **env):
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_thread_pool_size_follows_the_environment_and_can_be_changed():
    assert _run("import inference_pio as ip; print(ip.num_threads())", INFERENCE_PIO_THREADS="3") == "3"
    before = ip.num_threads()
    try:
        ip.set_num_threads(1)
        assert ip.num_threads() == 1
        x = ip.tensor([[1.0, 2.0]] * 1000)
        assert (x + x).tolist()[999] == [2.0, 4.0]  # ops still run on a pool of one
    finally:
        ip.set_num_threads(before)
    with pytest.raises(ip.InvalidArgumentError, match="threads"):
        ip.set_num_threads(0)


def test_simd_level_can_be_forced_down_but_not_up():
    detected = runtime.simd_level(detected=True)
    assert detected in ("scalar", "avx2", "avx512")
    assert _run("from inference_pio import runtime; print(runtime.simd_level())", INFERENCE_PIO_SIMD="scalar") == "scalar"
    if detected != "avx512":
        with pytest.raises(ip.InvalidArgumentError, match="not available"):
            runtime.set_simd_level("avx512")
    with pytest.raises(ValueError, match="unknown SIMD level"):
        runtime.set_simd_level("sse9")


def test_gpu_discovery_without_a_gpu_is_zero_not_an_error():
    n = ip.cuda_device_count()
    assert n >= 0
    if n == 0:
        with pytest.raises(ip.DeviceError, match="GPU|CUDA"):
            ip.Tensor.empty(4, device="cuda")


def test_library_errors_become_typed_exceptions_with_the_message():
    a = ip.Tensor.zeros(2, 3)
    with pytest.raises(ip.ShapeError, match=r"to_copy: out has shape \[2, 3\] but x has shape \[3, 2\]"):
        ip._lib.check(ip.lib.to_copy(a._desc, a.T._desc))
    with pytest.raises(ValueError, match="unknown device"):
        ip.Tensor.zeros(2, device="tpu")
    with pytest.raises(TypeError, match="unknown dtype"):
        ip.Tensor.zeros(2, dtype="float128")
