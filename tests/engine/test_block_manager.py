"""BlockManager's sharing: fork (a child takes its parent's blocks, counted once more), copy on
write (a sequence about to write into a shared block takes a private one, copied only when the
shared block already holds some of its positions: the partly filled last block), frees that
return a block only with its last reference, and the queued copies against the real KV cache
(KVCache.copy_blocks, ops.kv_copy_blocks)."""
import torch

from inference_pio import SamplingParams
from inference_pio.engine.block_manager import BlockManager
from inference_pio.engine.kv_cache import KVCache
from inference_pio.engine.scheduler import Scheduler
from inference_pio.engine.sequence import Sequence, Status

from helpers import from_torch, to_torch


def seq(i, n):
    return Sequence(i, list(range(1, n + 1)), SamplingParams(max_tokens=8), ())


def computed(bm, s, n):
    """s prefilled: n positions allocated and computed."""
    bm.allocate(s, n)
    s.num_computed += n


def fork(bm, parent, i):
    child = seq(i, 0)
    child.token_ids = list(parent.token_ids)
    bm.fork(parent, child)
    return child


def all_free(bm):
    return bm.num_free == bm.num_blocks and not any(bm.ref_counts) and not bm.take_copies()


def test_fork_shares_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, 6)
    computed(bm, a, 6)  # blocks: one full, one holding positions 4, 5
    b = fork(bm, a, 1)
    assert b.block_table == a.block_table and b.num_computed == 6
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2] and bm.num_free == 6
    bm.free(a)  # the child keeps them
    assert [bm.ref_counts[x] for x in b.block_table] == [1, 1] and bm.num_free == 6
    bm.free(b)
    assert all_free(bm)


def test_copy_on_write_copies_only_the_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, 6)
    computed(bm, a, 6)
    full, partial = a.block_table
    b, c = fork(bm, a, 1), fork(bm, a, 2)  # three sharers
    for s in (a, b, c):
        s.token_ids.append(9)  # each writes position 6, in the shared partial block
    assert bm.needed(a, 1) == 1 and bm.can_allocate(a, 1)  # a private copy
    bm.allocate(a, 1)
    assert a.block_table[0] == full and a.block_table[1] != partial
    assert bm.take_copies() == [(partial, a.block_table[1])]
    assert bm.ref_counts[partial] == 2 and bm.ref_counts[full] == 3
    bm.allocate(b, 1)  # still shared with c: another copy
    assert bm.take_copies() == [(partial, b.block_table[1])]
    assert bm.needed(c, 1) == 0  # the last holder writes in place
    bm.allocate(c, 1)
    assert c.block_table == [full, partial] and bm.take_copies() == []
    assert bm.ref_counts[full] == 3 and bm.ref_counts[partial] == 1
    assert len({a.block_table[1], b.block_table[1], c.block_table[1]}) == 3
    for s in (a, b, c):
        bm.free(s)
    assert all_free(bm)


def test_full_shared_blocks_stay_shared():
    # the fork point at a block boundary: the next position starts a new block, nothing copied
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, 8)
    computed(bm, a, 8)
    b = fork(bm, a, 1)
    for s in (a, b):
        s.token_ids.append(5)
        assert bm.needed(s, 1) == 1
        bm.allocate(s, 1)
        s.num_computed += 1
    assert a.block_table[:2] == b.block_table[:2] and a.block_table[2] != b.block_table[2]
    assert bm.take_copies() == [] and [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    # and a multi-token write across the shared partial block and new ones (a chunk)
    c = seq(2, 6)
    computed(bm, c, 6)
    d = fork(bm, c, 3)
    d.token_ids += [1, 2, 3, 4, 5]
    assert bm.needed(d, 5) == 1 + 1  # positions 6..10: a copy of block 1, and a new block 2
    bm.allocate(d, 5)
    assert bm.take_copies() == [(c.block_table[1], d.block_table[1])] and len(d.block_table) == 3
    for s in (a, b, c, d):
        bm.free(s)
    assert all_free(bm)


def test_queued_copies_survive_frees_in_the_same_step():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(0, 6)
    computed(bm, a, 6)
    partial = a.block_table[1]
    b = fork(bm, a, 1)
    b.token_ids.append(3)
    bm.allocate(b, 1)  # b copies `partial`...
    bm.free(a)  # ...which its last other holder frees before the copy ran
    assert bm.ref_counts[partial] == 0 and partial not in bm.free_blocks  # held for the copy
    assert bm.take_copies() == [(partial, b.block_table[1])]
    assert partial in bm.free_blocks  # free again once the copy is queued
    # a copy whose destination is freed before it ran is dropped
    c = fork(bm, b, 2)
    c.token_ids.append(4)
    bm.allocate(c, 1)
    dst = c.block_table[1]
    bm.free(c)
    assert bm.take_copies() == [] and dst in bm.free_blocks
    bm.free(b)
    assert all_free(bm)


def test_exhaustion_counts_the_copies():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(0, 6)
    computed(bm, a, 6)
    b = fork(bm, a, 1)
    b.token_ids += [1, 2, 3]  # positions 6..8: a copy of the partial block and a new block
    assert bm.needed(b, 3) == 2 and not bm.can_allocate(b, 3)
    b.token_ids = b.token_ids[:7]
    assert bm.needed(b, 1) == 1 and bm.can_allocate(b, 1)


def test_preempting_a_fork_leaves_its_siblings_intact():
    bm = BlockManager(num_blocks=5, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = seq(0, 6)
    sch.add(a)
    sch.computed(sch.schedule())
    b = fork(bm, a, 1)
    b.status = Status.RUNNING
    sch.running.append(b)
    shared = list(a.block_table)
    sch._preempt(b)
    assert b.block_table == [] and b.num_computed == 0 and sch.waiting[0] is b
    assert a.block_table == shared and [bm.ref_counts[x] for x in shared] == [1, 1]
    sch.finish(a)
    sch.finish(b)
    assert all_free(bm)


def test_copies_in_the_cache():
    # the block manager's copy-on-write applied to a real cache: the child sees its parent's
    # positions, and the two write their next positions without touching each other's
    bm = BlockManager(num_blocks=6, block_size=4)
    cache = KVCache(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=5, dtype="bfloat16")
    for i in range(3):
        for t in cache.layer(i):
            t.copy_(from_torch(torch.randn(6, 4, 2, 5).to(torch.bfloat16)))
    a = seq(0, 6)
    computed(bm, a, 6)
    before = [[to_torch(t).clone() for t in cache.layer(i)] for i in range(3)]
    b = fork(bm, a, 1)
    for s in (b, a):
        s.token_ids.append(1)
        bm.allocate(s, 1)
    cache.copy_blocks(bm.take_copies())
    src, dst = a.block_table[1], b.block_table[1]
    assert src != dst
    for i in range(3):
        for t, old in zip(cache.layer(i), before[i]):
            now = to_torch(t)
            assert torch.equal(now[dst], old[src])  # the whole block, positions 4, 5 with it
            others = [x for x in range(6) if x != dst]
            assert torch.equal(now[others], old[others])
    bm.free(a)
    bm.free(b)
    assert all_free(bm)
