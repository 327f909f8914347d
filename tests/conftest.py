import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

import inference_pio as ip  # noqa: E402
from inference_pio import runtime  # noqa: E402


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
    import torch
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
