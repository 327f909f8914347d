"""Element types. Each DType names a libtensor_ops dtype code, its size, and the struct format
its elements have in a Python buffer (bfloat16 has none: it shows as raw 16-bit patterns)."""
from ._lib import lib


class DType:
    __slots__ = ("name", "code", "itemsize", "format", "is_float")

    def __init__(self, name, code, itemsize, fmt, is_float):
        self.name, self.code, self.itemsize, self.format, self.is_float = name, code, itemsize, fmt, is_float

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

ALL = (float32, float16, bfloat16, int8, int32, int64, uint8)
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
