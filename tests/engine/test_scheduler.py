"""Block manager and scheduler: token budgets, chunked prefill, preemption under cache pressure,
and that none of it changes what is generated."""
import pytest

from inference_pio import LLM, SamplingParams
from inference_pio.engine.block_manager import BlockManager
from inference_pio.engine.scheduler import Scheduler
from inference_pio.engine.sequence import Sequence, Status

from checkpoints import qwen3_model, save_hf


def seq(i, n):
    return Sequence(i, list(range(1, n + 1)), SamplingParams(max_tokens=4), ())


def test_block_manager_slots_and_free():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = seq(0, 6), seq(1, 3)
    bm.allocate(a, 6)
    bm.allocate(b, 3)
    assert len(a.block_table) == 2 and len(b.block_table) == 1 and bm.num_free == 3
    assert [bm.slot(a, p) for p in range(6)] == [a.block_table[p // 4] * 4 + p % 4 for p in range(6)]
    a.num_computed = 6
    assert bm.needed(a, 2) == 0 and bm.needed(a, 3) == 1
    bm.free(a)
    assert bm.num_free == 5 and a.block_table == [] and a.num_computed == 0
    with pytest.raises(RuntimeError, match="KV cache exhausted"):
        bm.allocate(seq(2, 100), 100)


def test_budget_decode_first_then_chunked_prefill():
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    long, short = seq(0, 25), seq(1, 3)
    sch.add(long)
    sch.add(short)
    first = sch.schedule()
    assert [(s.request_id, n) for s, n in first] == [(0, 10)]  # the long prompt takes the budget
    sch.computed(first)
    second = sch.schedule()
    assert [(s.request_id, n) for s, n in second] == [(0, 10)]
    sch.computed(second)
    third = sch.schedule()  # 5 left of the long prompt, then the short one is admitted
    assert [(s.request_id, n) for s, n in third] == [(0, 5), (1, 3)]


def test_preemption_frees_newest():
    bm = BlockManager(num_blocks=4, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(0, 8), seq(1, 8)
    sch.add(a)
    sch.add(b)
    sch.computed(sch.schedule())
    assert bm.num_free == 0
    a.token_ids.append(7)  # a decodes: needs a third block, so b (newer) is preempted
    batch = sch.schedule()
    assert [(s.request_id, n) for s, n in batch] == [(0, 1)]
    assert b.status is Status.WAITING and b.num_computed == 0 and sch.waiting[0] is b


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf(qwen3_model(), tmp_path_factory.mktemp("sched"))


def test_generation_unchanged_by_preemption_and_limits(folder):
    prompts = [[3 + i] * (5 + 7 * i) for i in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0)
    roomy = LLM(folder, dtype="float32").generate(prompts, params)
    # 64 cache slots for four sequences that grow to 25..46 tokens: preemption must happen
    tight = LLM(folder, dtype="float32", kv_cache_tokens=64, max_model_len=64, block_size=4,
                max_num_batched_tokens=8, max_num_seqs=3)
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.blocks.num_free == tight.engine.blocks.num_blocks  # all returned
