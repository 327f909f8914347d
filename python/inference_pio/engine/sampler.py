"""Next tokens from logits rows: one to_sample_pipeline call for the whole batch, on the logits'
device (the processors and warpers, their order and the logprobs' distribution: SamplingParams).

Only small host tensors go in: the per-row parameters, one uniform draw per sampled row (from the
sequence's own generator), the token histories of the rows whose processors read them (CSR:
prompt + generated ids, and the prompt length that splits them) and the bias lists (logit_bias,
plus -inf for the stop and end-of-sequence ids while min_tokens is not reached). to_sample_pipeline
reads them on the host (a GPU run uploads the lists without waiting); the chosen ids come out, and
the logprobs when a row asks for them. With logits on a GPU the rows never leave it: only the ids
([B] int64) and the requested logprobs are copied back, and that copy (or the wait of its
asynchronous read) is where a bad logits row recorded by the GPU is raised.

The histories are the sequences' token_ids: a row that needs them cannot be sampled while a token
of its is still a placeholder (a step launched and not read back), which the overlapped decode
avoids (LLMEngine._can_follow). min_tokens only counts tokens, placeholders included."""
import math
from array import array

from .. import dtypes, ops
from ..tensor import Tensor


def _tensor(code, values, dtype):
    return Tensor.frombuffer(array(code, values), dtype)


def sample(logits, seqs):
    """Token ids (a list of ints) for logits [len(seqs), vocab], row i for seqs[i]."""
    return sample_ids(logits, seqs).ids.tolist()


def sample_ids(logits, seqs):
    """The step's sampling, launched: an ops.SampleResult on the logits' device, not waited for
    (read it with Sampled). Draws one uniform per sampled sequence now."""
    p = [s.params for s in seqs]
    want_logprobs = any(x.logprobs is not None for x in p)
    if not want_logprobs and all(x.greedy and not _processed(s) for x, s in zip(p, seqs)):
        return ops.SampleResult(ops.argmax(logits))  # on the logits' device: only the ids come back
    kw = {}
    if any(x.typical_p < 1 for x in p):
        kw["typical_p"] = _tensor("f", [x.typical_p for x in p], dtypes.float32)
    if any(x.repetition_penalty != 1 for x in p):
        kw["repetition_penalty"] = _tensor("f", [x.repetition_penalty for x in p], dtypes.float32)
    if any(x.presence_penalty != 0 for x in p):
        kw["presence_penalty"] = _tensor("f", [x.presence_penalty for x in p], dtypes.float32)
    if any(x.frequency_penalty != 0 for x in p):
        kw["frequency_penalty"] = _tensor("f", [x.frequency_penalty for x in p], dtypes.float32)
    if any(x.no_repeat_ngram_size for x in p):
        kw["no_repeat_ngram"] = _tensor("i", [x.no_repeat_ngram_size for x in p], dtypes.int32)
    if any(x.needs_history for x in p):
        kw.update(_histories(seqs))
    bias = [_bias(s, logits.shape[1]) for s in seqs]
    if any(bias):
        ids, values, offsets = array("i"), array("f"), array("i", [0])
        for row in bias:
            ids.extend(t for t, _ in row)
            values.extend(v for _, v in row)
            offsets.append(len(ids))
        kw.update(bias_ids=Tensor.frombuffer(ids, dtypes.int32), bias_values=Tensor.frombuffer(values, dtypes.float32),
                  bias_offsets=Tensor.frombuffer(offsets, dtypes.int32))
    num_top = max((x.logprobs or 0) for x in p)
    return ops.sample_pipeline(logits,
                               _tensor("f", [x.temperature for x in p], dtypes.float32),
                               _tensor("i", [x.top_k for x in p], dtypes.int32),
                               _tensor("f", [x.top_p for x in p], dtypes.float32),
                               _tensor("f", [x.min_p for x in p], dtypes.float32),
                               _tensor("f", [_uniform(s) for s in seqs], dtypes.float32),
                               logprobs=want_logprobs, num_top=num_top, **kw)


def _processed(seq):
    """Whether seq's logits are rewritten before its token is picked."""
    x = seq.params
    return x.needs_history or bool(x.logit_bias) or _min_tokens_pending(seq)


def _min_tokens_pending(seq):
    return seq.num_tokens - seq.num_prompt_tokens < seq.params.min_tokens and bool(seq.stop_ids)


def _histories(seqs):
    """The token histories of the rows that need them (empty for the others), CSR."""
    ids, offsets, prompts = array("i"), array("i", [0]), array("i")
    for s in seqs:
        if s.params.needs_history:
            assert s.num_pending == 0, "a history with a placeholder (see LLMEngine._can_follow)"
            ids.extend(s.token_ids)
            prompts.append(s.num_prompt_tokens)
        else:
            prompts.append(0)
        offsets.append(len(ids))
    return dict(history=Tensor.frombuffer(ids, dtypes.int32), history_offsets=Tensor.frombuffer(offsets, dtypes.int32),
                prompt_lens=Tensor.frombuffer(prompts, dtypes.int32))


def _bias(seq, vocab):
    """[(token id, value)]: logit_bias, then -inf for each stop id while min_tokens is pending
    (ids the logits do not have cannot be drawn anyway)."""
    row = list(seq.params.logit_bias.items()) if seq.params.logit_bias else []
    if _min_tokens_pending(seq):
        row += [(t, -math.inf) for t in sorted(seq.stop_ids) if t < vocab]
    return row


def _uniform(seq):
    """A draw in [0, 1) that stays below 1 once rounded to float32."""
    if seq.params.greedy:
        return 0.0
    return min(seq.rng.random(), 0.99999994)


class Sampled:
    """A step's sampled ids and logprobs on their way to the host (started now, read by
    result()). result() returns the ids; after it, .logprobs is None or one entry per row: None
    or {token id: logprob}, the chosen token first, then its row's SamplingParams.logprobs best.
    release() gives the reads back unread."""

    __slots__ = ("_reads", "_want", "logprobs")

    def __init__(self, res, seqs):
        self._want = [s.params.logprobs for s in seqs]
        reads = [res.ids]
        if res.logprobs is not None:
            reads.append(res.logprobs)
            if res.top_ids is not None:
                reads += [res.top_ids, res.top_logprobs]
        self._reads = [t.tolist_async() for t in reads]
        self.logprobs = None

    def result(self):
        values = [r.result() for r in self._reads]
        if len(values) > 1:
            ids, chosen = values[0], values[1]
            top_ids, top_lp = (values[2], values[3]) if len(values) > 2 else ([[]] * len(ids), [[]] * len(ids))
            self.logprobs = []
            for i, n in enumerate(self._want):
                if n is None:
                    self.logprobs.append(None)
                    continue
                entry = {ids[i]: chosen[i]}
                for t, v in zip(top_ids[i][:n], top_lp[i][:n]):
                    entry.setdefault(t, v)
                self.logprobs.append(entry)
        return values[0]

    def release(self):
        for r in self._reads:
            r.release()
