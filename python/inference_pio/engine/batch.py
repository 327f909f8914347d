"""ForwardBatch: one flat varlen batch of tokens from any number of sequences, in the layout
the model files and the attention op take. Prefill, chunked prefill and decode all look alike:
a sequence contributes a run of consecutive new tokens, attends to everything before them in
the cache, and asks for logits of its last row (or of every row, for llm.logits)."""
from array import array

from .. import dtypes
from .._lib import ffi
from ..tensor import Tensor

_FIELDS = ("token_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens",
           "block_tables", "logits_indices")


def _layout(scheduled, block_size, logits_for, width):
    """The batch's int32 arrays (by field name), the sampled sequences and the table width."""
    tokens, positions, slots, cu, ctx, logits_rows, tables = [], [], [], [0], [], [], []
    sampled = []
    for seq, n in scheduled:
        start, bt = seq.num_computed, seq.block_table
        tokens += seq.token_ids[start:start + n]
        positions += range(start, start + n)
        slots += [bt[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        if logits_for == "all":
            logits_rows += range(cu[-1], cu[-1] + n)
        elif start + n == seq.num_tokens:
            logits_rows.append(cu[-1] + n - 1)
            sampled.append(seq)
        cu.append(cu[-1] + n)
        ctx.append(start + n)
        tables.append(bt)
    width = width or max(len(bt) for bt in tables)
    flat_tables = [b for bt in tables for b in bt + [0] * (width - len(bt))]
    values = dict(token_ids=tokens, positions=positions, slot_mapping=slots, cu_seqlens_q=cu,
                  context_lens=ctx, block_tables=flat_tables, logits_indices=logits_rows)
    return {k: array("i", v) for k, v in values.items()}, sampled, width


class ForwardBatch:
    """Built from (sequence, number of new tokens) pairs; the new tokens of a sequence are
    token_ids[num_computed : num_computed + n] and their keys/values go to the cache slots the
    block manager gave the sequence. logits_for: "last" (the last row of each sequence whose
    tokens are then all computed: those get sampled) or "all" (every row). block_table_width
    fixes the block table's width (a graph's batch keeps one shape from step to step)."""

    def __init__(self, scheduled, block_manager, kv_cache, device="cpu", logits_for="last",
                 block_table_width=None):
        self.block_size, self.logits_for, self.kv_cache = block_manager.block_size, logits_for, kv_cache
        arrays, self.sampled, width = _layout(scheduled, self.block_size, logits_for, block_table_width)
        # Every field is a view of one int32 buffer, so that a step's batch goes to the GPU in one
        # copy: each copy is a transfer of its own on the GPU's timeline (a decode step made six).
        # Fields start at multiples of 4 entries (16 bytes).
        self._offsets = {}
        at = 0
        for name in _FIELDS:
            self._offsets[name] = at
            at += (len(arrays[name]) + 3) // 4 * 4
        self._packed = Tensor.frombuffer(_pack(arrays, self._offsets, at), dtypes.int32)
        if device != "cpu":
            self._packed = self._packed.to(device)
        for name in _FIELDS:
            setattr(self, name, self._packed.narrow(0, self._offsets[name], len(arrays[name])))
        self.block_tables = self.block_tables.view(len(scheduled), width)
        self.num_tokens = len(arrays["token_ids"])

    def update(self, scheduled, token_ids=True):
        """Rewrites the batch in place for another step of the same shape: the same number of
        sequences and tokens, and every row sampled (a decode step replayed by a graph).
        token_ids=False leaves the token ids to the caller (they come from the device)."""
        arrays, self.sampled, _ = _layout(scheduled, self.block_size, self.logits_for,
                                          self.block_tables.shape[1])
        for name in _FIELDS:
            t = getattr(self, name)
            if len(arrays[name]) != t.numel():
                raise ValueError(f"batch field {name} has {len(arrays[name])} entries, the graph's has {t.numel()}")
        packed = _pack(arrays, self._offsets, self._packed.numel())
        start = 0 if token_ids else self._offsets[_FIELDS[1]]  # token_ids come first
        n = self._packed.numel() - start
        if self._packed.is_cuda:
            self._packed.narrow(0, start, n).copy_(Tensor.frombuffer(packed, dtypes.int32, offset=4 * start))
        else:
            ffi.memmove(ffi.cast("int32_t *", self._packed.data_ptr()) + start, packed[start:], n * 4)


def _pack(arrays, offsets, size):
    """The fields' int32 arrays at their offsets in one array of `size` entries."""
    packed = array("i", bytes(4 * size))
    for name, a in arrays.items():
        packed[offsets[name]:offsets[name] + len(a)] = a
    return packed
