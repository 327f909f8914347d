"""Next tokens from logits rows: one to_sample call for the whole batch, on the logits' device.
Only the per-row parameters and one uniform draw per row (from the sequence's own generator) go
in, as small host tensors (to_sample reads parameters on the host whatever the logits' device);
the chosen ids come out. With logits on a GPU the rows never leave it: only the ids ([B] int64)
are copied back, and that copy (or the wait of its asynchronous read) is where a bad logits row
recorded by the GPU is raised."""
from array import array

from .. import dtypes, ops
from ..tensor import Tensor


def _tensor(code, values, dtype):
    return Tensor.frombuffer(array(code, values), dtype)


def sample(logits, seqs):
    """Token ids (a list of ints) for logits [len(seqs), vocab], row i for seqs[i]."""
    return sample_ids(logits, seqs).tolist()


def sample_ids(logits, seqs):
    """The ids as an int64 tensor [len(seqs)] on the logits' device, not waited for (the
    overlapped decode reads them back with tolist_async). Draws one uniform per sequence now."""
    if all(s.params.greedy for s in seqs):
        return ops.argmax(logits)  # on the logits' device: only the ids come back
    p = [s.params for s in seqs]
    return ops.sample(logits,
                      _tensor("f", [x.temperature for x in p], dtypes.float32),
                      _tensor("i", [x.top_k for x in p], dtypes.int32),
                      _tensor("f", [x.top_p for x in p], dtypes.float32),
                      _tensor("f", [x.min_p for x in p], dtypes.float32),
                      _tensor("f", [_uniform(s) for s in seqs], dtypes.float32))


def _uniform(seq):
    """A draw in [0, 1) that stays below 1 once rounded to float32."""
    if seq.params.greedy:
        return 0.0
    return min(seq.rng.random(), 0.99999994)
