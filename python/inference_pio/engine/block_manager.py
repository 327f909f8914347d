"""Hands out the fixed-size blocks of the paged KV cache pool to sequences, and shares them.

A sequence's block_table lists its blocks in position order; the slot of position p is
block_table[p // block_size] * block_size + p % block_size. Blocks are reference counted: fork()
gives a new sequence (a beam search child) its parent's table, every block counted once more, so
the prompt and the tokens computed so far are stored once. A shared block is read-only: before a
sequence writes into one (allocate(), which runs as the scheduler picks the sequence for a step)
it takes a private block in its place, and when the shared one already holds some of its
positions (the partly filled last block: full blocks are never written again) a copy of it is
queued; take_copies() hands the queued (src, dst) pairs to the engine, which copies them in the
cache (ops.kv_copy_blocks, one call for all pairs) before the step's forward writes anything.
A block returns to the free list when its last reference goes. Until the queued copies are
taken, a freed block that one of them reads stays out of the free list (it cannot be handed to
another sequence and overwritten first), and a copy into a freed block is dropped."""
from collections import deque


class BlockManager:
    def __init__(self, num_blocks, block_size):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self._copies = []  # (src, dst) copy-on-write copies queued since the last take_copies()
        self._held = []    # freed blocks that a queued copy still reads

    @property
    def num_free(self):
        return len(self.free_blocks)

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def _written_shared(self, seq, num_new):
        """Indices in seq's table of the shared blocks that positions num_computed ..
        num_computed + num_new - 1 fall in (each needs a private block before the write)."""
        if num_new <= 0:
            return []
        first = seq.num_computed // self.block_size
        last = min(len(seq.block_table), self.blocks_for(seq.num_computed + num_new))
        return [j for j in range(first, last) if self.ref_counts[seq.block_table[j]] > 1]

    def needed(self, seq, num_new):
        """Blocks seq must take so that its first num_computed + num_new positions have slots it
        may write: new ones past its table, and private copies of shared ones it writes into."""
        grow = max(0, self.blocks_for(seq.num_computed + num_new) - len(seq.block_table))
        return grow + len(self._written_shared(seq, num_new))

    def can_allocate(self, seq, num_new):
        return self.needed(seq, num_new) <= len(self.free_blocks)

    def _take(self):
        b = self.free_blocks.popleft()
        self.ref_counts[b] = 1
        return b

    def allocate(self, seq, num_new):
        n = self.needed(seq, num_new)
        if n > len(self.free_blocks):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self.free_blocks)} free")
        for j in self._written_shared(seq, num_new):  # copy on write
            old, new = seq.block_table[j], self._take()
            if j * self.block_size < seq.num_computed:  # it holds positions of seq: keep them
                self._copies.append((old, new))
            self.ref_counts[old] -= 1  # still >= 1: the other sharers keep it
            seq.block_table[j] = new
        while len(seq.block_table) < self.blocks_for(seq.num_computed + num_new):
            seq.block_table.append(self._take())

    def fork(self, parent, child):
        """child shares parent's blocks and computed positions (its tokens are the caller's)."""
        for b in parent.block_table:
            self.ref_counts[b] += 1
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed

    def free(self, seq):
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._release(b)
        seq.block_table = []
        seq.num_computed = 0

    def _release(self, b):
        if any(d == b for _, d in self._copies):  # nobody reads the copy any more
            self._copies = [(s, d) for s, d in self._copies if d != b]
        if any(s == b for s, _ in self._copies):
            self._held.append(b)
        else:
            self.free_blocks.appendleft(b)

    def take_copies(self):
        """The (src, dst) block copies queued since the last call, to be done before the next
        forward; the blocks they alone kept are free again after it."""
        copies, self._copies = self._copies, []
        for b in self._held:
            self.free_blocks.appendleft(b)
        self._held = []
        return copies

    def slot(self, seq, pos):
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
