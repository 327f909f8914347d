"""ForwardBatch: one flat varlen batch of tokens from any number of sequences, in the layout
the model files and the attention op take. Prefill, chunked prefill and decode all look alike:
a sequence contributes a run of consecutive new tokens, attends to everything before them in
the cache, and asks for logits of its last row (or of every row, for llm.logits)."""
from array import array

from .. import dtypes
from ..tensor import Tensor


def _i32(values, device):
    t = Tensor.frombuffer(array("i", values), dtypes.int32)
    return t if device == "cpu" else t.to(device)


class ForwardBatch:
    """Built from (sequence, number of new tokens) pairs; the new tokens of a sequence are
    token_ids[num_computed : num_computed + n] and their keys/values go to the cache slots the
    block manager gave the sequence. logits_for: "last" (the last row of each sequence whose
    tokens are then all computed: those get sampled) or "all" (every row)."""

    def __init__(self, scheduled, block_manager, kv_cache, device="cpu", logits_for="last"):
        tokens, positions, slots, cu, ctx, logits_rows, tables = [], [], [], [0], [], [], []
        self.sampled = []  # the sequences whose logits rows come out, in row order
        bs = block_manager.block_size
        for seq, n in scheduled:
            start = seq.num_computed
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            bt = seq.block_table
            slots += [bt[p // bs] * bs + p % bs for p in range(start, start + n)]
            if logits_for == "all":
                logits_rows += range(cu[-1], cu[-1] + n)
            elif start + n == seq.num_tokens:
                logits_rows.append(cu[-1] + n - 1)
                self.sampled.append(seq)
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            tables.append(bt)
        width = max(len(bt) for bt in tables)
        self.num_tokens = len(tokens)
        self.token_ids = _i32(tokens, device)
        self.positions = _i32(positions, device)
        self.slot_mapping = _i32(slots, device)
        self.cu_seqlens_q = _i32(cu, device)
        self.context_lens = _i32(ctx, device)
        self.block_tables = _i32([b for bt in tables for b in bt + [0] * (width - len(bt))],
                                 device).view(len(tables), width)
        self.logits_indices = _i32(logits_rows, device)
        self.kv_cache = kv_cache
