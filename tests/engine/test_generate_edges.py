"""generate() at its edges: max_tokens 0 and 1, empty prompts (an error, unless the tokenizer
adds a BOS), prompts longer than the context (an error naming both lengths), per-prompt
parameter lists of the wrong length, a refused prompt in a batch (nothing runs, nothing is left
behind), and n independent samples (one RequestOutput per prompt, its `outputs` the samples:
seeded ones reproducible and different from each other, sample 0 what n=1 gives)."""
import pytest

from inference_pio import LLM, SamplingParams
from inference_pio.engine.sequence import sample_seed

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer


@pytest.fixture(scope="module")
def llm(tok_folder):
    return LLM(tok_folder[0], dtype="float32", max_model_len=24)


def summary(out):
    return [(o.index, o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in out.outputs]


def test_max_tokens_zero_and_one(llm):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = llm.generate("Hello", greedy)[0]
    outs = llm.generate(["Hello", "the fox"], [SamplingParams(max_tokens=0, n=3),
                                                SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)])
    assert summary(outs[0]) == [(i, [], "", "length", None) for i in range(3)]
    assert outs[0].prompt_token_ids == ref.prompt_token_ids
    assert list(llm.stream("Hello", SamplingParams(max_tokens=0))) == []
    one = llm.generate("Hello", SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
    assert one.token_ids == ref.token_ids[:1] and one.finish_reason == "length"
    assert one.text == llm.tokenizer.decode(ref.token_ids[:1])
    assert len(outs[1].token_ids) == 1
    # max_tokens 0 needs no room for a new token: a prompt filling the context is fine
    assert llm.generate([list(range(24))], SamplingParams(max_tokens=0))[0].token_ids == []


def test_empty_prompt(llm):
    for empty in ("", [[]]):
        with pytest.raises(ValueError, match="the prompt is empty: at least one token is needed"):
            llm.generate(empty, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        next(llm.stream("", SamplingParams()))
    assert llm.generate([], SamplingParams()) == []  # no prompts at all: nothing to do


def test_empty_text_with_a_bos_tokenizer(tmp_path):
    """A tokenizer whose post-processor adds a BOS turns "" into one token: a valid prompt."""
    from tokenizers import processors
    oracle = save_qwen_tokenizer(tmp_path)
    bos = oracle.token_to_id("<|endoftext|>")
    oracle.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                          special_tokens=[("<|endoftext|>", bos)])
    oracle.save(str(tmp_path / "tokenizer.json"))
    save_hf(qwen3_model(seed=3), tmp_path)
    llm = LLM(tmp_path, dtype="float32")
    out = llm.generate("", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == [bos] and len(out.token_ids) == 4
    assert out.token_ids == llm.generate([[bos]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids


def test_prompt_longer_than_the_context(llm):
    with pytest.raises(ValueError, match=r"the prompt has 30 tokens: too long for a context of 24 tokens"):
        llm.generate([list(range(30))], SamplingParams())
    with pytest.raises(ValueError, match=r"has 24 tokens: too long for a context of 24 tokens "
                                         r"\(max_model_len\) with room for one new token"):
        llm.generate([list(range(24))], SamplingParams(max_tokens=1))
    out = llm.generate([list(range(23))], SamplingParams(max_tokens=5, temperature=0))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"  # the context ends it
    with pytest.raises(ValueError, match="too long"):
        llm.generate("word " * 40, SamplingParams())


def test_refused_prompt_leaves_nothing_behind(llm):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    alone = llm.generate("Hello", params)[0]
    with pytest.raises(ValueError, match="too long"):
        llm.generate(["Hello", list(range(30))], params)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(llm.stream(["Hello", [10 ** 6]], params))
    eng = llm.engine
    assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks
    assert llm.generate("Hello", params)[0].token_ids == alone.token_ids


def test_per_prompt_params_lists(llm):
    with pytest.raises(ValueError, match=r"a list of 2 \(one per prompt\), got a list of 3"):
        llm.generate(["a", "b"], [SamplingParams()] * 3)
    with pytest.raises(ValueError, match=r"a list of 2 \(one per prompt\), got a list of 1"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="must hold SamplingParams, got dict"):
        llm.generate(["a", "b"], [SamplingParams(), {"max_tokens": 3}])
    with pytest.raises(ValueError, match="a list of 1"):
        llm.stream("a", [SamplingParams()] * 2).send(None)
    # each prompt its own parameters, in one call: as when run alone
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.8, seed=4, ignore_eos=True, n=2),
              SamplingParams(max_tokens=5, temperature=0, stop="zzz", ignore_eos=True)]
    prompts = ["Hello", "the quick brown fox", [3, 4]]
    together = llm.generate(prompts, params)
    assert [summary(llm.generate(p, sp)[0]) for p, sp in zip(prompts, params)] == [summary(o) for o in together]
    assert [len(o.token_ids) for o in together] == [3, 7, 5]


def test_n_samples(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42, n=4, ignore_eos=True)
    out = llm.generate("the quick", params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4  # the samples differ
    first = out.outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == \
        (first.token_ids, first.text, first.finish_reason, first.stop_reason)
    # reproducible, alone or batched with others; sample 0 is what n=1 draws with the seed
    again = llm.generate(["x y", "the quick"], [SamplingParams(max_tokens=4, temperature=0.7), params])[1]
    assert summary(again) == summary(out)
    single = llm.generate("the quick", SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True))[0]
    assert single.token_ids == first.token_ids and len(single.outputs) == 1
    # another seed, other samples; no seed, samples that differ too
    assert summary(llm.generate("the quick", SamplingParams(**{**vars(params), "seed": 43}))[0]) != summary(out)
    unseeded = llm.generate("the quick", SamplingParams(max_tokens=12, temperature=1.0, n=3, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in unseeded.outputs}) == 3
    # greedy samples are allowed, and identical
    greedy = llm.generate("the quick", SamplingParams(max_tokens=8, temperature=0, n=3, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in greedy.outputs}) == 1 and len(greedy.outputs) == 3


def test_n_samples_finish_independently(llm, script):
    tok = llm.tokenizer
    prompt = tuple(tok.encode("Hi"))
    script[prompt] = tok.encode("aa bb cc dd")
    script[(prompt, 1)] = tok.encode("aa bb")
    script[(prompt, 2)] = tok.encode("aa")
    out = llm.generate("Hi", SamplingParams(max_tokens=8, n=3, stop=" bb"))[0]
    aa = tok.encode("aa")
    third = aa + aa[-1:] * (8 - len(aa))  # the script repeats its last token
    assert [(o.text, o.finish_reason, o.stop_reason) for o in out.outputs] == \
        [("aa", "stop", " bb"), ("aa", "stop", " bb"), (tok.decode(third), "length", None)]
    assert out.outputs[2].token_ids == third


def test_n_validation():
    for bad in (0, -1, 1.0, True, None):
        with pytest.raises(ValueError, match="SamplingParams.n must be an integer >= 1"):
            SamplingParams(n=bad)


def test_sample_seeds():
    assert sample_seed(None, 3) is None and sample_seed(7, 0) == 7
    seeds = {sample_seed(7, i) for i in range(1, 50)} | {sample_seed(8, i) for i in range(1, 50)}
    assert len(seeds) == 98 and 7 not in seeds
    assert sample_seed(7, 5) == sample_seed(7, 5)
    assert sample_seed(-7, 1) != sample_seed(7, 1) and isinstance(sample_seed(2 ** 70, 1), int)


def test_n_samples_share_the_prompt(tok_folder):
    """The n samples prefill the prompt once: after the prompt's step all of them hold the same
    blocks (no block used but the prompt's), the first write into the shared partly filled block
    copies it, and the samples are exactly what separate requests with their seeds draw."""
    llm = LLM(tok_folder[0], dtype="float32", block_size=4)
    eng = llm.engine
    prompt = llm.tokenizer.encode("the quick brown fox jumps")  # not a whole number of blocks
    assert len(prompt) % 4
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=9, n=4, ignore_eos=True)
    seqs = eng.add_samples(prompt, params)
    events = eng.step()  # the prompt, once; every sample draws its first token from its row
    assert [s for s, _ in events] == seqs
    tables = {tuple(s.block_table) for s in seqs}
    assert len(tables) == 1 and eng.blocks.num_free == eng.blocks.num_blocks - len(next(iter(tables)))
    eng.step()  # each writes its first token: the shared last block is copied for all but one
    assert len({s.block_table[-1] for s in seqs}) == 4
    assert len({tuple(s.block_table[:-1]) for s in seqs}) == 1  # the full blocks stay shared
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_free == eng.blocks.num_blocks
    shared = [s.completion_ids for s in seqs]
    alone = [llm.generate([prompt], SamplingParams(**{**vars(params), "n": 1, "seed": sample_seed(9, i)}))[0].token_ids
             for i in range(4)]
    assert shared == alone


@pytest.mark.parametrize("overlap", [False, True])
def test_n_samples_of_a_one_token_prompt(tok_folder, overlap):
    """A one-token prompt's step is a decode step (graphs, overlap): the samples join all the same."""
    llm = LLM(tok_folder[0], dtype="float32", overlap=overlap)
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=2, n=3, ignore_eos=True)
    out = llm.generate([[5]], params)[0]
    alone = [llm.generate([[5]], SamplingParams(**{**vars(params), "n": 1, "seed": sample_seed(2, i)}))[0].token_ids
             for i in range(3)]
    assert [o.token_ids for o in out.outputs] == alone


def test_aborting_sample_zero_first_lets_the_others_run(tok_folder):
    llm = LLM(tok_folder[0], dtype="float32")
    eng = llm.engine
    params = SamplingParams(max_tokens=3, temperature=0, n=3, ignore_eos=True)
    first, *others = eng.add_samples([5, 6, 7], params)
    eng.abort(first)  # before its prompt ran: the others prefill it themselves
    while eng.has_unfinished():
        eng.step()
    greedy = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert first.finish_reason == "abort" and [o.completion_ids for o in others] == [greedy.token_ids] * 2
    assert eng.blocks.num_free == eng.blocks.num_blocks
