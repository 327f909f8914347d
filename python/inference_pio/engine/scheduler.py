"""Continuous batching: which sequences run in the next forward, and how many tokens each.

Every step has a token budget. Running sequences go first, in admission order (a decoding one
needs one token; one still prefilling gets the next chunk of its prompt), then waiting ones are
admitted while budget, sequence slots and cache blocks last. A prompt longer than the remaining
budget is prefilled in chunks over several steps. When the cache runs out, the most recently
admitted sequence is preempted: its blocks are freed and it waits to be recomputed from its
tokens, so older requests always make progress. Before that, blocks held by idle sequences are
reclaimed (`reclaim`: beams waiting out of the scheduler for the rest of their group, which keep
their logits and are recomputed later), also when they are all that keeps a waiting sequence out
of an otherwise empty step."""
from collections import deque

from .sequence import Status


class Scheduler:
    def __init__(self, block_manager, max_num_seqs, max_num_batched_tokens):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting, self.running = deque(), []
        self.num_preemptions = 0
        self.reclaim = None  # frees blocks of idle sequences, returns whether it freed any (beam search)

    def add(self, seq):
        self.waiting.append(seq)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def schedule(self):
        """[(sequence, number of new tokens)] for the next forward (empty only when idle)."""
        budget, batch = self.max_num_batched_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, n):
                if self.reclaim is not None and self.reclaim():
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.blocks.allocate(seq, n)
            batch.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, n) and (
                    batch or self.reclaim is None or not self.reclaim() or not self.blocks.can_allocate(seq, n)):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq):
        self.running.remove(seq)
        self.blocks.free(seq)
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def computed(self, batch):
        """Records that the batch's tokens are now in the cache."""
        for seq, n in batch:
            seq.num_computed += n

    def finish(self, seq):
        """Takes a finished (or aborted) sequence out and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
