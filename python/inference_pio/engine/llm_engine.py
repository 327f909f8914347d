"""The engine loop: requests in, one batched forward per step, tokens out.

LLMEngine owns the model, the KV cache, the block manager and the scheduler. step() asks the
scheduler for a batch, runs the model once over it (every sequence's new tokens together),
samples the sequences that finished their prefill or are decoding, and reports what each of
them produced.

Overlapped decode (overlap=True; "auto": on a GPU with graphs). Between two decode steps the host
schedules, lays out and uploads the batch, launches the graph and reads the sampled ids back;
on a GPU that leaves it idle unless the next step is already queued. So after a decode step run
from a graph, step n+1 is launched before step n's ids are read, when
  - step n scheduled every running sequence (one token each, in the scheduler's order),
  - nothing is waiting to be admitted,
  - the free blocks give each of those sequences room for one more token (no preemption), and
  - none of them ends at step n by its length (max_tokens or max_model_len, known in advance):
then the synchronous scheduler would pick the same sequences, less any that stop at step n on a
stop or EOS token. Step n+1's token ids are step n's sampled ids, copied into its batch on the
device; positions, slots, block tables and context lengths come from the host (they do not
depend on the tokens). Until its id is read, a sequence holds a placeholder token that
num_computed and its blocks already count, so the scheduler and block manager see what they
would have seen. A sequence found stopped at step n has computed one more token in step n+1: it
is dropped unreported. Every other step (prefill, chunked or mixed, arrivals, preemption, graphs
off, a beam search step, one in which a request's other samples join its first: add_samples)
first reads the step in flight back, then runs synchronously. So each finish costs one step
with nothing launched behind it: the last step of a length finish, the step after a stop. A
request added while a step is in flight joins the step after that one (one step later than the
synchronous engine would admit it).
Seeded draws are taken as a step launches, one per sampled token of a sequence, as before: a
draw spent on a dropped token belonged to a finished sequence.
Logits processors that read a sequence's tokens (repetition / presence / frequency penalties, the
n-gram block: SamplingParams.needs_history) cannot run behind an unread step, whose token is still
a placeholder: a step with such a sequence is never followed before it is read (it runs as the
synchronous engine would). min_tokens only counts tokens, logit_bias reads none: they overlap.
The outputs are the synchronous engine's, exactly when the kernels give each row the same
result whatever the other rows: the step launched behind a stop token still has the stopped row,
and an arrival joins a later step (on a GPU the number of rows picks the matmul path above 8 and
the attention's key splits, so the other rows' roundings may differ from the synchronous step's).
"""
from array import array

from .. import dtypes, ops
from ..tensor import Tensor
from .batch import ForwardBatch
from .beam_search import BeamSearch
from .block_manager import BlockManager
from .graphs import DecodeGraphs
from .kv_cache import KVCache
from .params import SamplingParams
from .sampler import Sampled, sample_ids
from .scheduler import Scheduler
from .sequence import OutputText, Sequence, Status


class LLMEngine:
    def __init__(self, model, eos_ids, max_model_len, kv_cache_tokens, block_size=16,
                 max_num_seqs=64, max_num_batched_tokens=512, kv_dtype=None, use_graphs=True,
                 overlap="auto", detokenizer=None):
        self.model = model
        # skip_special_tokens -> the tokenizer's incremental decoder: sequences with stop strings
        # (or streamed) decode their text as tokens arrive (sequence.OutputText)
        self.detokenizer = detokenizer
        self.eos_ids = list(eos_ids)
        num_blocks = -(-kv_cache_tokens // block_size)
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        layers, kv_heads, head_dim = model.kv_cache_spec
        self.kv_cache = KVCache(layers, num_blocks, block_size, kv_heads, head_dim,
                                kv_dtype or model.dtype, model.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.graphs = DecodeGraphs(model, self.kv_cache, self.blocks, self.max_model_len) if use_graphs else None
        if overlap == "auto":
            overlap = self.graphs is not None and model.device != "cpu"
        elif overlap not in (True, False):
            raise ValueError(f"overlap must be True, False or 'auto', got {overlap!r}")
        elif overlap and self.graphs is None:
            raise ValueError("overlap needs the decode graphs (use_graphs=True, not enforce_eager)")
        self.overlap = overlap
        self._inflight = None  # the decode step launched and not read back yet (_Launched)
        self._next_id = 0
        self.beams = BeamSearch(self)  # beam search requests (beam_search.py)
        self._forks = {}  # sample 0 of a request -> its other samples, until its prompt is computed

    def add_request(self, prompt_ids, params, index=0, text=False):
        """Queues a request; returns its Sequence (which fills in as steps run). index: which of
        the request's n samples it is (its random stream). text: decode its text as the tokens
        arrive (for a stream; stop strings always do)."""
        prompt_ids = self._check_prompt(prompt_ids, room=params.max_tokens > 0)
        self._check_vocab(params)
        seq = Sequence(self._next_id, prompt_ids, params, self.eos_ids, index,
                       OutputText.make(self.detokenizer, params, text))
        self._next_id += 1
        if params.max_tokens == 0:
            seq.finish("length")
        else:
            self.scheduler.add(seq)
        return seq

    def add_samples(self, prompt_ids, params, text=False):
        """Queues a request's params.n samples; returns their Sequences. Sample 0 is queued as by
        add_request; the others wait until its prompt is in the cache, then join it sharing its
        blocks (BlockManager.fork; the partly filled last block is copied on the first write),
        each drawing its first token from the same logits row: the prompt is prefilled and
        stored once, whatever n."""
        first = self.add_request(prompt_ids, params, 0, text)
        others = []
        for i in range(1, params.n):
            seq = Sequence(self._next_id, first.token_ids, params, self.eos_ids, i,
                           OutputText.make(self.detokenizer, params, text))
            self._next_id += 1
            if params.max_tokens == 0:
                seq.finish("length")
            others.append(seq)
        if others and first.status is not Status.FINISHED:
            self._forks[first] = others
        return [first] + others

    def add_beam_request(self, prompt_ids, params):
        """Queues a beam search (BeamSearchParams); returns its BeamRequest (beam_search.py),
        done once its hypotheses are."""
        req = self.beams.add(self._next_id, self._check_prompt(prompt_ids, room=True), params)
        self._next_id += 1
        return req

    def _check_prompt(self, prompt_ids, room):
        """The prompt as a list of valid ids that fits the context (with room for one more token
        when `room`); ValueError otherwise."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) + room > self.max_model_len:
            why = " with room for one new token" if room and len(prompt_ids) == self.max_model_len else ""
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens: too long for a context of "
                             f"{self.max_model_len} tokens (max_model_len){why}")
        return prompt_ids

    def _check_vocab(self, params):
        """ValueError for logit_bias ids or a logprobs count the vocabulary does not have."""
        vocab = self.model.config.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs = {params.logprobs} asks for more alternatives than the "
                             f"vocabulary has ({vocab})")

    def abort(self, seq):
        for other in self._forks.pop(seq, ()):  # its other samples prefill their own prompt now
            if other.status is not Status.FINISHED:
                self.scheduler.add(other)
        if seq.status is not Status.FINISHED:
            # drops its placeholders: a step in flight skips it (its freed blocks: see _read)
            seq.finish("abort")
        self.scheduler.finish(seq)

    def has_unfinished(self):
        return self._inflight is not None or self.scheduler.has_unfinished()

    def step(self):
        """Runs one forward; returns [(sequence, new token id)] for the sequences sampled. With
        overlap, a decode step's tokens are reported by the call after the one that launched it
        (the events are still in order, one per sampled token)."""
        if self._inflight is None:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return []
            if (not (self.overlap and DecodeGraphs.applies(scheduled)) or self.beams.requests
                    or (self._forks and any(seq in self._forks for seq, _ in scheduled))):
                # (beam steps change the beams, and samples join their first: never overlapped)
                return self._run(scheduled)
            self._inflight = self._launch(scheduled)
        step = self._inflight
        if self._can_follow(step):  # schedule() then picks step's sequences again, one token each
            self._inflight = self._launch(self.scheduler.schedule(), step.ids)
        else:
            self._inflight = None
        return self._read(step)

    def drain(self):
        """Reads the step in flight back, if any; returns its events."""
        step, self._inflight = self._inflight, None
        return self._read(step) if step is not None else []

    def _can_follow(self, step):
        """Whether the next step may be launched behind `step` (see the module docstring)."""
        s = self.scheduler
        return (not s.waiting and s.running == step.seqs and not self.beams.requests
                and sum(self.blocks.needed(q, 1) for q in step.seqs) <= self.blocks.num_free
                and not any(q.at_length_limit(self.max_model_len) for q in step.seqs)
                and not any(q.params.needs_history for q in step.seqs))

    def _launch(self, scheduled, token_ids=None):
        """Queues a decode step from its graph, its token ids read on the device from token_ids
        when given, and starts reading its sampled ids back; its sequences take placeholders."""
        self.kv_cache.copy_blocks(self.blocks.take_copies())  # copy on write, before the forward
        logits, batch = self.graphs.run(scheduled, token_ids)
        res = sample_ids(logits, batch.sampled)
        self.scheduler.computed(scheduled)
        for seq in batch.sampled:
            seq.append_placeholder()
        return _Launched(batch.sampled, res.ids, Sampled(res, batch.sampled))

    def _read(self, step):
        """Waits for a launched step's ids and hands them to its sequences: the events."""
        try:
            ids = step.readback.result()
        except BaseException:
            # the step launched behind read its token ids from this one: it goes too
            if self._inflight is not None:
                self._inflight.readback.release()
                self._inflight = None
            raise
        events, logprobs = [], step.readback.logprobs
        for i, (seq, tid) in enumerate(zip(step.seqs, ids)):
            if seq.status is Status.FINISHED:  # at the step before, or aborted: the token is dropped
                continue
            seq.fill(tid, self.max_model_len)
            if logprobs and logprobs[i] is not None:
                seq.add_logprobs(logprobs[i])
            events.append((seq, tid))
            if seq.status is Status.FINISHED:
                # its blocks may be handed out while the step launched behind still writes this
                # sequence's last slot: a later write to them is queued after that step (one stream)
                self.scheduler.finish(seq)
        return events

    def _run(self, scheduled):
        """A step run synchronously: forward, sample, read the ids, update the sequences."""
        self.kv_cache.copy_blocks(self.blocks.take_copies())  # copy on write, before the forward
        if self.graphs is not None and DecodeGraphs.applies(scheduled):
            logits, batch = self.graphs.run(scheduled)
        else:
            batch = ForwardBatch(scheduled, self.blocks, self.kv_cache, self.model.device)
            logits = self.model(batch)  # no rows when only prefill chunks ran: the layers still fill the cache
        self.scheduler.computed(scheduled)
        if not batch.sampled:
            return []
        beams = [(i, seq) for i, seq in enumerate(batch.sampled) if seq.beam is not None]
        if beams:  # their rows go to the beam search step, not to the sampler's ids
            self.beams.step(logits, beams)
            if len(beams) == len(batch.sampled):
                return []
        seqs = batch.sampled
        if self._forks:
            seqs, logits = self._join_samples(seqs, logits)
        # (beam rows, greedy for the sampler, are sampled with the others and skipped: one call)
        events, sampled = [], Sampled(sample_ids(logits, seqs), seqs)
        for seq, tid, lp in zip(seqs, sampled.result(), sampled.logprobs or [None] * len(seqs)):
            if seq.beam is not None:
                continue
            seq.append(tid, self.max_model_len)
            if lp is not None:
                seq.add_logprobs(lp)
            events.append((seq, tid))
            if seq.status is Status.FINISHED:
                self.scheduler.finish(seq)
        return events

    def _join_samples(self, seqs, logits):
        """(seqs, logits) with the waiting samples of every sequence in seqs whose prompt this step
        computed (add_samples) joined: forked from it, and its logits row repeated for each."""
        rows, joined = list(range(len(seqs))), []
        for i, seq in enumerate(seqs):
            for other in self._forks.pop(seq, ()):
                if other.status is Status.FINISHED:  # aborted while it waited
                    continue
                assert seq.num_tokens == seq.num_prompt_tokens, "a sample joins before its first token"
                self.blocks.fork(seq, other)
                other.status = Status.RUNNING
                self.scheduler.running.append(other)
                rows.append(i)
                joined.append(other)
        if not joined:
            return seqs, logits
        idx = Tensor.frombuffer(array("q", rows), dtypes.int64).to(logits.device)
        return seqs + joined, ops.embedding(logits, idx)

    def all_logits(self, prompt_ids):
        """float32 logits [n, vocab] of every position of one sequence, prefilled in chunks of the
        step budget through the same paged cache (its blocks are freed afterwards)."""
        seq = Sequence(-1, self._check_prompt(prompt_ids, room=False), SamplingParams(), ())
        n = seq.num_tokens
        out = Tensor.empty((n, self.model.config.vocab_size))
        chunk = min(self.scheduler.max_num_batched_tokens, 512)  # each chunk's logits: [chunk, vocab] f32
        try:
            while seq.num_computed < n:
                k = min(chunk, n - seq.num_computed)
                if not self.blocks.can_allocate(seq, k):
                    raise RuntimeError("the KV cache is busy or too small for this sequence")
                self.blocks.allocate(seq, k)
                batch = ForwardBatch([(seq, k)], self.blocks, self.kv_cache, self.model.device, logits_for="all")
                out[seq.num_computed:seq.num_computed + k] = self.model(batch)
                seq.num_computed += k
        finally:
            self.blocks.free(seq)
        return out


class _Launched:
    """A decode step in flight: its sequences (row order), its sampled ids on the device, and
    their read back to the host."""

    __slots__ = ("seqs", "ids", "readback")

    def __init__(self, seqs, ids, readback):
        self.seqs, self.ids, self.readback = seqs, ids, readback
