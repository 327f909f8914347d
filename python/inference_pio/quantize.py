"""Weight-only quantization: which tensors a block type applies to, and a weights view that
quantizes them as they load (LLM(path, quantization="q8_0")). The quantize command
(export.py) uses the same choice, so a quantized load and a quantized GGUF file agree.

Which tensors: every matrix (2-D weight: the projections, the token embedding and the output
head), as llama.cpp quantizes them; vectors (norm weights, biases) stay float. A matrix whose
rows are not a whole number of the type's blocks falls back: k-quants (256-element blocks) to
q8_0 where rows are a multiple of 32 (SmolLM2's 576-wide rows, for instance), otherwise float.
"""
from . import dtypes, ops

QUANT_TYPES = {d.name: d for d in dtypes.QUANTIZED}


def quant_type(name):
    """The block dtype called `name` (ValueError naming the choices otherwise)."""
    if isinstance(name, dtypes.DType) and name.is_quantized:
        return name
    if name not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[name]


def target_dtype(shape, qtype):
    """The block dtype a weight of `shape` is stored in under quantization `qtype`, or None to
    leave it float."""
    if len(shape) != 2:
        return None
    for candidate in (qtype, dtypes.q8_0):
        if shape[-1] % candidate.block_size == 0:
            return candidate
    return None


def quantize_weight(w, qtype):
    """w in the block dtype target_dtype picks (unchanged if it already is, or stays float)."""
    target = target_dtype(w.shape, qtype)
    if target is None or w.dtype is target:
        return w
    return ops.quantize(w.contiguous(), target)


class QuantizedWeights:
    """A checkpoint's weights (names(), [name]) with its matrices quantized to `qtype` on access."""

    def __init__(self, weights, qtype):
        self.weights, self.qtype = weights, quant_type(qtype)
        self.folder = weights.folder

    def names(self):
        return self.weights.names()

    def __getitem__(self, name):
        return quantize_weight(self.weights[name], self.qtype)
