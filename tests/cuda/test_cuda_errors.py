"""Bad index values on a GPU: the kernels that follow indices (embedding ids, cache slots, the
attention batch) check every value on the GPU, skip a bad one instead of reading or writing out of
bounds, and record it; the next call that waits for the GPU (a copy to the host, or
to_cuda_synchronize) raises the error, naming the op and the index. Nothing else is lost: the
GPU keeps working and the error is raised once."""
import pytest
import torch

import inference_pio as ip
from inference_pio._lib import check

from helpers import from_torch, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")


def ints(values, dtype=torch.int32):
    return from_torch(torch.tensor(values, dtype=dtype), "cuda")


def test_bad_embedding_id_is_reported_at_the_next_copy(gen):
    table = torch.randn(10, 6, generator=gen)
    out = ip.ops.embedding(from_torch(table, "cuda"), ints([3, 9, 99, 0], torch.int64))
    with pytest.raises(ip.BoundsError, match=r"to_embedding: ids\[2\] = 99 is outside \[0, 10\)"):
        out.cpu()
    got = to_torch(out)  # reported once; the good rows were written
    assert torch.equal(got[[0, 1, 3]], table[[3, 9, 0]])
    again = ip.ops.embedding(from_torch(table, "cuda"), ints([-1]))
    with pytest.raises(ip.BoundsError, match=r"ids\[0\] = -1"):
        check(ip.lib.to_cuda_synchronize(0))
    assert again.shape == (1, 6)


def caches(nb=4, bs=4, hkv=2, d=8):
    return (ip.Tensor.zeros(nb, bs, hkv, d, device="cuda"), ip.Tensor.zeros(nb, bs, hkv, d, device="cuda"))


def test_bad_slot_is_skipped_and_reported(gen):
    kc, vc = caches()
    k = torch.randn(3, 2, 8, generator=gen)
    ip.ops.kv_cache_store(kc, vc, from_torch(k, "cuda"), from_torch(k, "cuda"), ints([5, 16, -1]))
    with pytest.raises(ip.BoundsError, match=r"slot_mapping\[1\] = 16 is not below num_blocks \* block_size = 16"):
        kc.cpu()
    stored = to_torch(kc).reshape(16, 2, 8)
    assert torch.equal(stored[5], k[0]) and stored.abs().sum() == k[0].abs().sum()


def test_bad_slot_in_rope_kv_store_is_skipped_and_reported(gen):
    """The fused rotation and store records a bad slot as kv_cache_store does, naming itself; the
    other tokens are stored, and every token's heads are still rotated into out."""
    kc, vc = caches()
    qk = torch.randn(3, 5, 8, generator=gen)  # 3 q heads, then the 2 k heads
    v = torch.randn(3, 2, 8, generator=gen)
    pos, inv = ints([4, 0, 9], torch.int64), from_torch(torch.tensor([1.0, 0.1, 0.01, 0.001]), "cuda")
    q = from_torch(qk, "cuda")
    ip.ops.rope_kv_store(q, pos, inv, from_torch(v, "cuda"), kc, vc, ints([5, 16, -1]), out=q)
    with pytest.raises(ip.BoundsError, match=r"to_rope_kv_store: slot_mapping\[1\] = 16 is not below num_blocks "
                                             r"\* block_size = 16; that token's k and v were not stored"):
        kc.cpu()
    rotated = to_torch(ip.ops.rope(from_torch(qk, "cuda"), pos, inv))
    assert torch.equal(to_torch(q), rotated)
    stored_k, stored_v = to_torch(kc).reshape(16, 2, 8), to_torch(vc).reshape(16, 2, 8)
    assert torch.equal(stored_k[5], rotated[0, 3:]) and torch.equal(stored_v[5], v[0])
    assert stored_k.abs().sum() == rotated[0, 3:].abs().sum() and stored_v.abs().sum() == v[0].abs().sum()
    # reported once; the GPU works on
    ip.ops.rope_kv_store(from_torch(qk, "cuda"), pos, inv, from_torch(v, "cuda"), kc, vc, ints([1, 2, 3]))
    assert torch.equal(to_torch(vc).reshape(16, 2, 8)[1:4], v)


@pytest.mark.parametrize("field,values,message", [
    ("block_tables", [[0, 9]], "block_tables holds a block outside"),
    ("context_lens", [2], "context_lens is less than its queries"),
    ("context_lens", [9], "context_lens needs more blocks than block_tables has"),
    ("cu_seqlens_q", [0, 2], r"cu_seqlens_q is not non-decreasing from 0 to T"),
])
def test_bad_attention_batch_is_skipped_and_reported(gen, field, values, message):
    kc, vc = caches()
    batch = {"cu_seqlens_q": [0, 3], "context_lens": [6], "block_tables": [[2, 1]]}
    batch[field] = values
    q = from_torch(torch.randn(3, 4, 8, generator=gen), "cuda")
    out = ip.ops.paged_attention(q, kc, vc, ints(batch["cu_seqlens_q"]), ints(batch["context_lens"]),
                                 ints(batch["block_tables"]), 0.5)
    with pytest.raises(ip.BoundsError, match=f"to_paged_attention: sequence 0: {message}"):
        out.cpu()
    # the GPU works on: a good batch right after gives the same as the CPU
    good = [ints(batch_v) for batch_v in ([0, 3], [6], [[2, 1]])]
    out = ip.ops.paged_attention(q, kc, vc, *good, 0.5)
    ref = ip.ops.paged_attention(q.cpu(), kc.cpu(), vc.cpu(), *(t.cpu() for t in good), 0.5)
    assert torch.allclose(to_torch(out), to_torch(ref), atol=1e-6)
