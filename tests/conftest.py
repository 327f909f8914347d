import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

import torch  # noqa: E402

from inference_pio import runtime  # noqa: E402

# torch's OpenMP workers spin after each parallel region, as ours do after each job; on a small
# machine the two pools fight over the cores and every call slows down several times over. The
# oracle's tensors are small: one torch thread is plenty.
torch.set_num_threads(1)


@pytest.fixture(params=["native", "scalar"])
def simd(request):
    """Runs a test on the best SIMD path of this CPU and on the forced portable scalar path."""
    before = runtime.simd_level()
    if request.param == "scalar":
        runtime.set_simd_level("scalar")
    yield request.param
    runtime.set_simd_level(before)


@pytest.fixture
def gen():
    """A torch generator seeded freshly each run (the seed is printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Runs a model test on the CPU and, where a GPU is visible (the lent H200), on the GPU."""
    import inference_pio as ip
    if request.param == "cuda" and ip.cuda_device_count() == 0:
        pytest.skip("no GPU visible (CUDA not built in, or no driver/device)")
    return request.param
