"""The engine loop: requests in, one batched forward per step, tokens out.

LLMEngine owns the model, the KV cache, the block manager and the scheduler. step() asks the
scheduler for a batch, runs the model once over it (every sequence's new tokens together),
samples the sequences that finished their prefill or are decoding, and reports what each of
them produced."""
from ..tensor import Tensor
from .batch import ForwardBatch
from .block_manager import BlockManager
from .graphs import DecodeGraphs
from .kv_cache import KVCache
from .params import SamplingParams
from .sampler import sample
from .scheduler import Scheduler
from .sequence import Sequence, Status


class LLMEngine:
    def __init__(self, model, eos_ids, max_model_len, kv_cache_tokens, block_size=16,
                 max_num_seqs=64, max_num_batched_tokens=512, kv_dtype=None, use_graphs=True):
        self.model = model
        self.eos_ids = list(eos_ids)
        num_blocks = -(-kv_cache_tokens // block_size)
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        layers, kv_heads, head_dim = model.kv_cache_spec
        self.kv_cache = KVCache(layers, num_blocks, block_size, kv_heads, head_dim,
                                kv_dtype or model.dtype, model.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.graphs = DecodeGraphs(model, self.kv_cache, self.blocks, self.max_model_len) if use_graphs else None
        self._next_id = 0

    def add_request(self, prompt_ids, params):
        """Queues a request; returns its Sequence (which fills in as steps run)."""
        prompt_ids = self._check_prompt(prompt_ids, room=params.max_tokens > 0)
        seq = Sequence(self._next_id, prompt_ids, params, self.eos_ids)
        self._next_id += 1
        if params.max_tokens == 0:
            seq.finish("length")
        else:
            self.scheduler.add(seq)
        return seq

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
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens: too long for a context of "
                             f"{self.max_model_len} tokens (max_model_len)")
        return prompt_ids

    def abort(self, seq):
        if seq.status is not Status.FINISHED:
            seq.finish("abort")
        self.scheduler.finish(seq)

    def has_unfinished(self):
        return self.scheduler.has_unfinished()

    def step(self):
        """Runs one forward; returns [(sequence, new token id)] for the sequences sampled."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        if self.graphs is not None and DecodeGraphs.applies(scheduled):
            logits, batch = self.graphs.run(scheduled)
        else:
            batch = ForwardBatch(scheduled, self.blocks, self.kv_cache, self.model.device)
            logits = self.model(batch)  # no rows when only prefill chunks ran: the layers still fill the cache
        self.scheduler.computed(scheduled)
        if not batch.sampled:
            return []
        events = []
        for seq, tid in zip(batch.sampled, sample(logits, batch.sampled)):
            seq.append(tid, self.max_model_len)
            events.append((seq, tid))
            if seq.status is Status.FINISHED:
                self.scheduler.finish(seq)
        return events

    def all_logits(self, prompt_ids):
        """float32 logits [n, vocab] of every position of one sequence, prefilled in chunks of the
        step budget through the same paged cache (its blocks are freed afterwards)."""
        seq = Sequence(-1, self._check_prompt(prompt_ids, room=False), SamplingParams(), ())
        n = seq.num_tokens
        out = Tensor.empty((n, self.model.config.vocab_size))
        chunk = self.scheduler.max_num_batched_tokens
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
