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
from ..tensor import Storage, Tensor


class _Inputs:
    """The step's host tensors, carved out of one float32 and one int32 buffer (two buffer
    borrows per step instead of one per tensor: each costs ~10 us of Python)."""

    def __init__(self):
        self._f, self._i, self._parts = array("f"), array("i"), []

    def add(self, code, values):
        buf = self._f if code == "f" else self._i
        start = len(buf)
        buf.extend(values)
        self._parts.append((code, start, len(buf) - start))
        return len(self._parts) - 1

    def join(self, first):
        """Merges parts first.. (consecutive in one buffer) into one; returns its index."""
        code, at, _ = self._parts[first]
        n = sum(m for _, _, m in self._parts[first:])
        del self._parts[first:]
        self._parts.append((code, at, n))
        return len(self._parts) - 1

    def tensors(self):
        st = {c: Storage.borrow(b) for c, b in (("f", self._f), ("i", self._i)) if len(b)}
        return [Tensor(st[c], (n,), (1,), dtypes.float32 if c == "f" else dtypes.int32, offset=4 * at)
                if n else Tensor.empty(0, dtype=dtypes.float32 if c == "f" else dtypes.int32)
                for c, at, n in self._parts]


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
    inp, kw = _Inputs(), {}
    base = [inp.add("f", [x.temperature for x in p]), inp.add("i", [x.top_k for x in p]),
            inp.add("f", [x.top_p for x in p]), inp.add("f", [x.min_p for x in p]),
            inp.add("f", [_uniform(s) for s in seqs])]
    if any(x.typical_p < 1 for x in p):
        kw["typical_p"] = inp.add("f", [x.typical_p for x in p])
    if any(x.repetition_penalty != 1 for x in p):
        kw["repetition_penalty"] = inp.add("f", [x.repetition_penalty for x in p])
    if any(x.presence_penalty != 0 for x in p):
        kw["presence_penalty"] = inp.add("f", [x.presence_penalty for x in p])
    if any(x.frequency_penalty != 0 for x in p):
        kw["frequency_penalty"] = inp.add("f", [x.frequency_penalty for x in p])
    if any(x.no_repeat_ngram_size for x in p):
        kw["no_repeat_ngram"] = inp.add("i", [x.no_repeat_ngram_size for x in p])
    if any(x.needs_history for x in p):
        _histories(seqs, inp, kw)
    bias = [_bias(s, logits.shape[1]) for s in seqs]
    if any(bias):
        offsets = [0]
        for row in bias:
            offsets.append(offsets[-1] + len(row))
        kw["bias_ids"] = inp.add("i", [t for row in bias for t, _ in row])
        kw["bias_values"] = inp.add("f", [v for row in bias for _, v in row])
        kw["bias_offsets"] = inp.add("i", offsets)
    t = inp.tensors()
    num_top = max((x.logprobs or 0) for x in p)
    return ops.sample_pipeline(logits, *(t[i] for i in base), logprobs=want_logprobs, num_top=num_top,
                               **{k: t[i] for k, i in kw.items()})


def _processed(seq):
    """Whether seq's logits are rewritten before its token is picked."""
    x = seq.params
    return x.needs_history or bool(x.logit_bias) or _min_tokens_pending(seq)


def _min_tokens_pending(seq):
    return seq.num_tokens - seq.num_prompt_tokens < seq.params.min_tokens and bool(seq.stop_ids)


def _histories(seqs, inp, kw):
    """The token histories of the rows that need them (empty for the others), CSR."""
    offsets, prompts, n = [0], [], 0
    start = None
    for s in seqs:
        if s.params.needs_history:
            assert s.num_pending == 0, "a history with a placeholder (see LLMEngine._can_follow)"
            i = inp.add("i", _history(s))
            start = i if start is None else start
            n += s.num_tokens
            prompts.append(s.num_prompt_tokens)
        else:
            prompts.append(0)
        offsets.append(n)
    # the histories were added one after another: one tensor over all of them
    kw["history"] = inp.join(start)
    kw["history_offsets"] = inp.add("i", offsets)
    kw["prompt_lens"] = inp.add("i", prompts)


def _history(seq):
    """seq.token_ids as an int32 array, kept on the sequence and extended as tokens are appended
    (converting a long Python list every step would cost ~60 us per 1,000 tokens). The cache
    names the list it copies: a sequence given another list (a copy, a fork) starts afresh."""
    ids = seq.token_ids
    owner, h = seq.sampler_history or (None, None)
    if owner is not ids or len(h) > len(ids) or (h and h[-1] != ids[len(h) - 1]):
        h = array("i", ids)
        seq.sampler_history = (ids, h)
    elif len(h) < len(ids):
        h.extend(ids[len(h):])
    return h


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
