"""Fixtures of the generation tests: a checkpoint folder with a tokenizer, and a way to make the
engine produce chosen tokens (so that stop strings, multi-byte characters and held-back stream
text are tested on exactly the token boundaries wanted, while the model and the engine run as
they always do)."""
from array import array

import pytest

from inference_pio import dtypes, ops
from inference_pio.engine import llm_engine
from inference_pio.tensor import Tensor
from inference_pio.tokenizer.pretokenize import bytes_to_unicode

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer


@pytest.fixture(scope="session")
def tok_folder(tmp_path_factory):
    """(folder, `tokenizers` oracle): a tiny Qwen3 with the trained Qwen-style tokenizer, its EOS
    <|im_end|> (from generation_config.json)."""
    folder = tmp_path_factory.mktemp("generation")
    oracle = save_qwen_tokenizer(folder)
    save_hf(qwen3_model(seed=7), folder, generation={"eos_token_id": oracle.token_to_id("<|im_end|>")})
    return folder, oracle


def byte_token(tokenizer, b):
    """The id of the single-byte token of byte value b (byte-level BPE has all 256)."""
    return tokenizer.tokenizer.vocab[bytes_to_unicode()[b]]


@pytest.fixture
def script(monkeypatch):
    """{key: token ids}: the engine "samples" these instead of drawing from the logits (the
    forward still runs; only the choice is replaced, in both the synchronous and the overlapped
    step). Key: (prompt ids tuple, sample index), or the prompt ids tuple for every sample. The
    k-th new token of a sequence is script[key][k]; past the end, the last one again."""
    scripts = {}

    def pick(seqs):
        out = []
        for s in seqs:
            prompt = tuple(s.token_ids[:s.num_prompt_tokens])
            ids = scripts.get((prompt, s.index), scripts.get(prompt))
            k = s.num_tokens - s.num_prompt_tokens  # placeholders counted: the overlapped step too
            out.append(ids[min(k, len(ids) - 1)])
        return out
    monkeypatch.setattr(llm_engine, "sample_ids", lambda logits, seqs: ops.SampleResult(Tensor.frombuffer(
        array("q", pick(seqs)), dtypes.int64, copy=True)))
    return scripts
