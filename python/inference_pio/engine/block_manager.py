"""Hands out the fixed-size blocks of the paged KV cache pool to sequences.

Blocks are reference counted so that a later prefix cache or beam search can share them; today
each block has one owner. A sequence's block_table lists its blocks in position order; the slot
of position p is block_table[p // block_size] * block_size + p % block_size."""
from collections import deque


class BlockManager:
    def __init__(self, num_blocks, block_size):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self):
        return len(self.free_blocks)

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def needed(self, seq, num_new):
        """Blocks seq must add so that its first num_computed + num_new positions have slots."""
        return max(0, self.blocks_for(seq.num_computed + num_new) - len(seq.block_table))

    def can_allocate(self, seq, num_new):
        return self.needed(seq, num_new) <= len(self.free_blocks)

    def allocate(self, seq, num_new):
        n = self.needed(seq, num_new)
        if n > len(self.free_blocks):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self.free_blocks)} free")
        for _ in range(n):
            b = self.free_blocks.popleft()
            self.ref_counts[b] = 1
            seq.block_table.append(b)

    def free(self, seq):
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks.appendleft(b)
        seq.block_table = []
        seq.num_computed = 0

    def slot(self, seq, pos):
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
