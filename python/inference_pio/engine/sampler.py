"""Next tokens from logits rows: one to_sample call for the whole batch. Only the per-row
parameters and one uniform draw per row (from the sequence's own generator) go in; the chosen
ids come out."""
from array import array

from .. import dtypes, ops
from ..tensor import Tensor


def _tensor(code, values, dtype):
    return Tensor.frombuffer(array(code, values), dtype)


def sample(logits, seqs):
    """Token ids (a list of ints) for logits [len(seqs), vocab], row i for seqs[i]."""
    if all(s.params.greedy for s in seqs):
        return ops.argmax(logits).tolist()  # on the logits' device: only the ids come back
    if logits.is_cuda:  # no GPU sampling kernel yet: the rows come to the host
        logits = logits.cpu()
    p = [s.params for s in seqs]
    out = ops.sample(logits,
                     _tensor("f", [x.temperature for x in p], dtypes.float32),
                     _tensor("i", [x.top_k for x in p], dtypes.int32),
                     _tensor("f", [x.top_p for x in p], dtypes.float32),
                     _tensor("f", [x.min_p for x in p], dtypes.float32),
                     _tensor("f", [_uniform(s) for s in seqs], dtypes.float32))
    return out.tolist()


def _uniform(seq):
    """A draw in [0, 1) that stays below 1 once rounded to float32."""
    if seq.params.greedy:
        return 0.0
    return min(seq.rng.random(), 0.99999994)
