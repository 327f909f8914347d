"""Element types. Each DType names a libtensor_ops dtype code, its size, and the struct format
its elements have in a Python buffer (bfloat16 has none: it shows as raw 16-bit patterns).

Block-quantized weight types (q8_0, q4_0, q4_1, q4_k, q6_k: GGML's blocks) store `block_size`
elements in `block_bytes` bytes; they have no per-element size (itemsize 0) and no buffer format.
A quantized tensor's last dimension is a whole number of blocks.

q4_0x8, q4_1x8 and q8_0x8 hold the same blocks as q4_0, q4_1 and q8_0 with those of every 8 rows
interleaved, the layout the CPU matmul reads fastest: only contiguous 2-D tensors with a multiple
of 8 rows, made with ops.quantize (from their plain type or from floats), taken by matmul as
weights and by embedding as tables."""
from ._lib import lib


class DType:
    __slots__ = ("name", "code", "itemsize", "format", "is_float", "block_size", "block_bytes")

    def __init__(self, name, code, itemsize, fmt, is_float, block=None):
        self.name, self.code, self.itemsize, self.format, self.is_float = name, code, itemsize, fmt, is_float
        self.block_size, self.block_bytes = block or (1, itemsize)

    @property
    def is_quantized(self):
        return self.block_size > 1

    def nbytes(self, numel):
        """Bytes that `numel` elements occupy (a whole number of blocks for quantized types)."""
        if numel % self.block_size:
            raise ValueError(f"{self.name} stores blocks of {self.block_size} elements; "
                             f"{numel} elements are not a whole number of blocks")
        return numel // self.block_size * self.block_bytes

    def __repr__(self):
        return self.name

    def __reduce__(self):
        return (get_dtype, (self.name,))


float32 = DType("float32", lib.TO_F32, 4, "f", True)
float16 = DType("float16", lib.TO_F16, 2, "e", True)
bfloat16 = DType("bfloat16", lib.TO_BF16, 2, "H", True)
int8 = DType("int8", lib.TO_I8, 1, "b", False)
int32 = DType("int32", lib.TO_I32, 4, "i", False)
int64 = DType("int64", lib.TO_I64, 8, "q", False)
uint8 = DType("uint8", lib.TO_U8, 1, "B", False)
q8_0 = DType("q8_0", lib.TO_Q8_0, 0, None, True, (32, 34))
q4_0 = DType("q4_0", lib.TO_Q4_0, 0, None, True, (32, 18))
q4_1 = DType("q4_1", lib.TO_Q4_1, 0, None, True, (32, 20))
q4_k = DType("q4_k", lib.TO_Q4_K, 0, None, True, (256, 144))
q6_k = DType("q6_k", lib.TO_Q6_K, 0, None, True, (256, 210))
q4_0x8 = DType("q4_0x8", lib.TO_Q4_0_X8, 0, None, True, (32, 18))
q4_1x8 = DType("q4_1x8", lib.TO_Q4_1_X8, 0, None, True, (32, 20))
q8_0x8 = DType("q8_0x8", lib.TO_Q8_0_X8, 0, None, True, (32, 34))

QUANTIZED = (q8_0, q4_0, q4_1, q4_k, q6_k)  # the GGML block types (quantization choices)
ROW_INTERLEAVED = {q4_0x8: q4_0, q4_1x8: q4_1, q8_0x8: q8_0}  # -> the plain type whose blocks they hold
ALL = (float32, float16, bfloat16, int8, int32, int64, uint8) + QUANTIZED + tuple(ROW_INTERLEAVED)
BY_CODE = {d.code: d for d in ALL}
_ALIASES = {"f32": float32, "float": float32, "f16": float16, "half": float16, "bf16": bfloat16,
            "i8": int8, "i32": int32, "int": int64, "i64": int64, "long": int64, "u8": uint8}


def get_dtype(d):
    """A DType from a DType, its name ("bfloat16") or a short alias ("bf16")."""
    if isinstance(d, DType):
        return d
    if isinstance(d, str):
        for cand in ALL:
            if cand.name == d:
                return cand
        if d in _ALIASES:
            return _ALIASES[d]
    raise TypeError(f"unknown dtype {d!r}; expected one of {', '.join(x.name for x in ALL)}")
