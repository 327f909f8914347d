"""Reading and writing GGUF files (llama.cpp's model format) without the gguf package.

Layout (versions 2 and 3 are identical; all little-endian): the magic b"GGUF", a u32 version, u64
tensor count, u64 metadata count; the metadata entries (string key, u32 value type, value); the
tensor table (string name, u32 dim count, u64 dims innermost-first, u32 GGML type id, u64 offset
relative to the data section); zero padding up to `general.alignment` (default 32); the data
section, every tensor starting at an aligned offset. A string is a u64 byte length and UTF-8
bytes; an array is a u32 element type, a u64 count and the elements.

GGUFFile maps the file read-only and hands out Tensors viewing the mapped bytes (zero-copy), in
PyTorch dim order: GGUF dims [in, out] are shape (out, in) over the same row-major bytes. Every
header field is validated at open, so a damaged file fails there with its path in the message.

Strings are decoded as UTF-8 with errors="surrogateescape": valid UTF-8 (every sane file) decodes
as usual, and the odd invalid byte becomes a lone surrogate (PEP 383) instead of an exception or
a lossy U+FFFD, so nothing is lost: s.encode("utf-8", "surrogateescape") gives the file's bytes
back, and GGUFWriter writes such strings back byte for byte.
"""
import enum
import mmap
import os
import struct

from .. import dtypes
from .._lib import ffi
from ..tensor import Tensor
from .safetensors import CheckpointError, MappedFile

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME is 64 bytes including the terminating NUL
ALIGNMENT_KEY = "general.alignment"
MAX_ARRAY_NESTING = 32


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read; the message names the path and the problem."""


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_V = GGUFValueType
# struct formats of the fixed-size value types. BOOL is one byte; any non-zero byte reads True.
_SCALAR_FORMATS = {_V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I",
                   _V.INT32: "i", _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q",
                   _V.FLOAT64: "d"}
_SCALARS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")
_ARRAY_HEAD = struct.Struct("<IQ")
_TYPE_AND_OFFSET = struct.Struct("<IQ")
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]
_INT_RANGES = {_V.UINT8: (0, 2 ** 8), _V.INT8: (-2 ** 7, 2 ** 7), _V.UINT16: (0, 2 ** 16),
               _V.INT16: (-2 ** 15, 2 ** 15), _V.UINT32: (0, 2 ** 32),
               _V.INT32: (-2 ** 31, 2 ** 31), _V.UINT64: (0, 2 ** 64),
               _V.INT64: (-2 ** 63, 2 ** 63)}
_FLOATS = (_V.FLOAT32, _V.FLOAT64)

# GGML tensor types: id -> (name, elements per block, bytes per block). Ids 4, 5, 31-33 and 36-38
# belonged to layouts llama.cpp has removed; files using them cannot be sized, so they count as
# unknown.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# The GGML types this engine computes with, and their dtypes (the same bytes: the quantized
# dtypes are GGML's block layouts).
ENGINE_DTYPES = {0: dtypes.float32, 1: dtypes.float16, 30: dtypes.bfloat16, 8: dtypes.q8_0,
                 2: dtypes.q4_0, 3: dtypes.q4_1, 12: dtypes.q4_k, 14: dtypes.q6_k,
                 24: dtypes.int8, 26: dtypes.int32, 27: dtypes.int64}
_GGML_TYPE_OF_DTYPE = {d: i for i, d in ENGINE_DTYPES.items()}
SUPPORTED_TYPES = ", ".join(GGML_TYPES[i][0] for i in ENGINE_DTYPES)


def _decode(raw):
    return str(raw, "utf-8", "surrogateescape")  # raw: bytes or a memoryview slice


def _encode(text):
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _pad(n, alignment):
    return -n % alignment


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_nbytes(type_id, shape):
    """Bytes of a tensor of GGML type `type_id` and (PyTorch-order) shape; None when the innermost
    dim is not a whole number of blocks."""
    _, block_size, block_bytes = GGML_TYPES[type_id]
    innermost = shape[-1] if shape else 1
    if innermost % block_size:
        return None
    return _numel(shape) // block_size * block_bytes


class GGUFTensorInfo:
    """Where one tensor lies: its GGML type id, shape (PyTorch order), absolute byte offset of its
    data in the file and its size in bytes."""

    __slots__ = ("name", "type_id", "shape", "offset", "nbytes")

    def __init__(self, name, type_id, shape, offset, nbytes):
        self.name, self.type_id, self.shape, self.offset, self.nbytes = (
            name, type_id, shape, offset, nbytes)

    @property
    def type_name(self):
        return GGML_TYPES[self.type_id][0]

    @property
    def dtype(self):
        """The engine dtype of this tensor's type, or None when the engine lacks it."""
        return ENGINE_DTYPES.get(self.type_id)

    def __eq__(self, other):
        return isinstance(other, GGUFTensorInfo) and all(
            getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self):
        return (f"GGUFTensorInfo({self.name!r}, {self.type_name}, shape={self.shape}, "
                f"offset={self.offset}, nbytes={self.nbytes})")


# ---------------------------------------------------------------------------------------------
# Reading

class _Cursor:
    """Reads fields from the mapped file in order. Every read is bounds-checked first, so a short
    file becomes a GGUFError saying what was being read, never a struct.error."""

    __slots__ = ("path", "buf", "pos", "end")

    def __init__(self, path, buf, pos, end):
        self.path, self.buf, self.pos, self.end = path, buf, pos, end

    def error(self, problem):
        return GGUFError(self.path, problem)

    def truncated(self, what, need):
        return self.error(f"truncated: {what} needs {need} bytes at offset {self.pos}, "
                          f"the file has {self.end - self.pos} left")

    def take(self, st, what):
        if self.pos + st.size > self.end:
            raise self.truncated(what, st.size)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def room_for(self, count, item_bytes, what):
        """Refuses a count whose items cannot fit in the rest of the file (before looping)."""
        if count * item_bytes > self.end - self.pos:
            raise self.error(f"truncated: {what} has {count} items, which need at least "
                             f"{count * item_bytes} bytes; the file has {self.end - self.pos} left")

    def string(self, what):
        (n,) = self.take(_U64, f"the length of {what}")
        if n > self.end - self.pos:
            raise self.error(f"truncated: {what} is {n} bytes long, the file has "
                             f"{self.end - self.pos} left at offset {self.pos}")
        start = self.pos
        self.pos += n
        return _decode(self.buf[start:self.pos])

    def value(self, vtype, what):
        """(value, type spec) of one metadata value of type `vtype`."""
        st = _SCALARS.get(vtype)
        if st is not None:
            return self.take(st, what)[0], _V(vtype)
        if vtype == _V.STRING:
            return self.string(what), _V.STRING
        if vtype == _V.ARRAY:
            return self.array(what)
        raise self.error(f"{what}: unknown metadata value type {vtype}")

    def array(self, what, depth=0):
        if depth > MAX_ARRAY_NESTING:  # 12 bytes a level: a small file could exhaust the stack
            raise self.error(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype, count = self.take(_ARRAY_HEAD, f"the array header of {what}")
        fmt = _SCALAR_FORMATS.get(etype)
        if fmt is not None:
            size = _SCALARS[etype].size
            self.room_for(count, size, what)
            values = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
            self.pos += count * size
            return values, (_V.ARRAY, _V(etype))
        if etype == _V.STRING:
            self.room_for(count, 8, what)
            return self._strings(count, what), (_V.ARRAY, _V.STRING)
        if etype == _V.ARRAY:
            self.room_for(count, _ARRAY_HEAD.size, what)
            items = [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
            return [v for v, _ in items], (_V.ARRAY, _nested_spec([s for _, s in items]))
        raise self.error(f"{what}: unknown array element type {etype}")

    def _strings(self, count, what):
        # Token and merge lists hold 50k-300k strings: this loop is the whole cost of opening a
        # file, so it reads lengths straight off the map with as little per-item work as it can.
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.truncated(f"the length of {what}[{i}]", 8)
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                raise self.error(f"truncated: {what}[{i}] is {n} bytes long, the file has "
                                 f"{end - pos} left at offset {pos}")
            append(str(buf[pos:pos + n], "utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out


def _nested_spec(specs):
    """The element spec of an array of arrays: the sub-arrays' common spec, a list of one spec per
    sub-array when they differ, or bare ARRAY for an empty array (nothing records more)."""
    if not specs:
        return _V.ARRAY
    if all(s == specs[0] for s in specs):
        return specs[0]
    return list(specs)


def _check_header(path, head, size):
    """(version, tensor count, metadata count) from the file's first bytes."""
    if head[:4] != MAGIC[:len(head)]:
        raise GGUFError(path, f"not a GGUF file (starts with {bytes(head[:4])!r}, "
                              f"expected {MAGIC!r})")
    if len(head) >= 8:
        (version,) = _U32.unpack_from(head, 4)
        if version == 1:
            raise GGUFError(path, "GGUF version 1 is not supported (only versions 2 and 3): "
                                  "version 1 predates 64-bit counts; re-convert the model with "
                                  "a current llama.cpp")
        if version not in (2, 3):
            swapped = int.from_bytes(head[4:8], "big")
            if swapped in (2, 3):
                raise GGUFError(path, f"big-endian GGUF file (version {swapped}): only "
                                      "little-endian files are supported")
            raise GGUFError(path, f"unsupported GGUF version {version} (only 2 and 3)")
    if len(head) < _HEADER.size:
        raise GGUFError(path, f"truncated: file of {size} bytes is too short for the "
                              f"{_HEADER.size}-byte GGUF header")
    _, version, n_tensors, n_kv = _HEADER.unpack_from(head)
    return version, n_tensors, n_kv


def _alignment(path, metadata, types):
    if ALIGNMENT_KEY not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata[ALIGNMENT_KEY]
    if types[ALIGNMENT_KEY] != _V.UINT32:
        raise GGUFError(path, f"bad {ALIGNMENT_KEY}: type {_spec_name(types[ALIGNMENT_KEY])}, "
                              "expected UINT32")
    if value <= 0 or value & (value - 1):
        raise GGUFError(path, f"bad {ALIGNMENT_KEY} {value}: not a power of two")
    return value


def _spec_name(spec):
    if isinstance(spec, tuple):
        return f"ARRAY of {_spec_name(spec[1])}"
    if isinstance(spec, list):
        return "[" + ", ".join(_spec_name(s) for s in spec) + "]"
    return _V(spec).name


class GGUFFile(MappedFile):
    """One GGUF file, memory-mapped read-only.

    version, alignment, data_offset (where the data section starts); metadata (key -> int,
    float, bool, str or list, in file order) and metadata_types (key -> type spec: a
    GGUFValueType, or (ARRAY, element spec) for arrays; see GGUFWriter.add); tensors (name ->
    GGUFTensorInfo, in file order). get(name) returns a read-only Tensor viewing the mapping,
    raw(name) its bytes; both stay valid after close() as long as they are referenced."""

    error = GGUFError

    def __init__(self, path):
        with self._open(path) as f:
            size = os.fstat(f.fileno()).st_size
            self.version, n_tensors, n_kv = _check_header(self.path, f.read(_HEADER.size), size)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            # Parsing reads through a memoryview: its slices decode without an interim bytes
            # copy. It is released before anything else can hold the map.
            with memoryview(self._mmap) as view:
                cur = _Cursor(self.path, view, _HEADER.size, size)
                self._read_metadata(cur, n_kv)
                self.alignment = _alignment(self.path, self.metadata, self.metadata_types)
                self._read_tensor_table(cur, n_tensors)
                self.data_offset = cur.pos + _pad(cur.pos, self.alignment)
            self._place_tensors(size)
        except GGUFError:
            self.close()
            raise

    def _read_metadata(self, cur, count):
        # The smallest entry is an empty key (8 bytes), its type (4) and a one-byte value.
        cur.room_for(count, 13, "the metadata table")
        self.metadata, self.metadata_types = {}, {}
        for i in range(count):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise cur.error(f"duplicate metadata key {key!r}")
            (vtype,) = cur.take(_U32, f"the value type of metadata {key!r}")
            self.metadata[key], self.metadata_types[key] = cur.value(vtype, f"metadata {key!r}")

    def _read_tensor_table(self, cur, count):
        # The smallest entry: empty name (8), dim count (4), type (4), offset (8).
        cur.room_for(count, 24, "the tensor table")
        self._infos = {}
        for i in range(count):
            name = cur.string(f"tensor name #{i}")
            if name in self._infos:
                raise cur.error(f"duplicate tensor name {name!r}")
            self._infos[name] = self._read_tensor_entry(cur, name)

    def _read_tensor_entry(self, cur, name):
        """A GGUFTensorInfo whose offset is still relative to the data section."""
        what = f"tensor {name!r}"
        (n_dims,) = cur.take(_U32, f"the dim count of {what}")
        if n_dims > MAX_DIMS:
            raise cur.error(f"{what} has {n_dims} dims, more than GGML's {MAX_DIMS}")
        dims = cur.take(_DIMS[n_dims], f"the dims of {what}")
        type_id, offset = cur.take(_TYPE_AND_OFFSET, f"the type and offset of {what}")
        for d in dims:
            if not 0 < d < 2 ** 63:  # GGML dims are int64: the top half of u64 is negative
                signed = d if d < 2 ** 63 else d - 2 ** 64
                raise cur.error(f"{what} has dims {list(dims)}: dim {signed} is not a positive "
                                "size")
        if type_id not in GGML_TYPES:
            raise cur.error(f"{what} has unknown GGML type id {type_id}")
        shape = tuple(reversed(dims))
        nbytes = _tensor_nbytes(type_id, shape)
        if nbytes is None:
            type_name, block_size, _ = GGML_TYPES[type_id]
            raise cur.error(f"{what} of type {type_name} has innermost dim {shape[-1]}, not a "
                            f"multiple of its block size {block_size}")
        if offset % self.alignment:
            raise cur.error(f"{what} has data offset {offset}, not a multiple of the "
                            f"alignment {self.alignment}")
        return GGUFTensorInfo(name, type_id, shape, offset, nbytes)

    def _place_tensors(self, size):
        """Makes offsets absolute, and checks every tensor lies inside the file and apart."""
        for info in self._infos.values():
            info.offset += self.data_offset
            end = info.offset + info.nbytes
            if end > size:
                raise GGUFError(self.path, f"truncated: tensor {info.name!r} data ends at byte "
                                           f"{end}, past the end of the file ({size} bytes)")
        spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in self._infos.values())
        for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise GGUFError(self.path, f"tensors {prev!r} and {name!r} overlap")

    # ---- tensors ----
    @property
    def tensors(self):
        return dict(self._infos)

    def tensor_info(self, name):
        if name not in self._infos:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._infos[name]

    def names(self):
        return list(self._infos)

    def __contains__(self, name):
        return name in self._infos

    def __len__(self):
        return len(self._infos)

    def _mapping(self):
        if self._mmap is None:
            raise GGUFError(self.path, "file is closed")
        return self._mmap

    def get(self, name):
        """A read-only Tensor over the tensor's bytes in the map, in the engine's dtype."""
        info = self.tensor_info(name)
        if info.dtype is None:
            raise GGUFError(self.path, f"tensor {name!r} has GGML type {info.type_name}, which "
                                       f"this engine does not support (supported: "
                                       f"{SUPPORTED_TYPES})")
        return Tensor.frombuffer(self._mapping(), info.dtype, info.shape, offset=info.offset)

    def raw(self, name):
        """The tensor's bytes in the map as a read-only memoryview, whatever its type (for
        copying tensors of types the engine does not compute with)."""
        info = self.tensor_info(name)
        return memoryview(self._mapping())[info.offset:info.offset + info.nbytes]

    def __repr__(self):
        return (f"GGUFFile({self.path!r}, version {self.version}, {len(self.metadata)} "
                f"metadata, {len(self._infos)} tensors)")


# ---------------------------------------------------------------------------------------------
# Writing

def _as_vtype(t):
    """A GGUFValueType from a GGUFValueType, its id or its name ("UINT32", "uint32")."""
    try:
        return _V[t.upper()] if isinstance(t, str) else _V(t)
    except (KeyError, ValueError):
        raise ValueError(f"unknown GGUF value type {t!r}; expected one of "
                         f"{', '.join(v.name for v in _V)}") from None


def _int_vtype(values):
    """UINT32 when every int fits it (llama.cpp reads counts and ids as u32), else INT64, else
    UINT64 for values only it holds."""
    lo, hi = min(values), max(values)
    if lo >= 0 and hi < 2 ** 32:
        return _V.UINT32
    if lo >= -2 ** 63 and hi < 2 ** 63:
        return _V.INT64
    if lo >= 0 and hi < 2 ** 64:
        return _V.UINT64
    raise ValueError(f"integer {hi if hi >= 2 ** 63 else lo} does not fit in 64 bits")


def _infer_spec(value):
    """The type spec GGUFWriter.add gives a value passed without one."""
    if isinstance(value, (list, tuple)):
        return (_V.ARRAY, _infer_element_spec(value))
    if isinstance(value, bool):
        return _V.BOOL
    if isinstance(value, int):
        return _int_vtype([value])
    if isinstance(value, float):
        return _V.FLOAT32
    if isinstance(value, (str, bytes)):
        return _V.STRING
    raise TypeError(f"cannot store a {type(value).__name__} as GGUF metadata")


def _infer_element_spec(values):
    if not values:
        raise ValueError("cannot infer the element type of an empty list; pass element_type")
    kinds = {bool if isinstance(v, bool) else int if isinstance(v, int) else
             float if isinstance(v, float) else str if isinstance(v, (str, bytes)) else
             list if isinstance(v, (list, tuple)) else type(v) for v in values}
    if kinds == {bool}:
        return _V.BOOL
    if kinds == {int}:
        return _int_vtype(values)
    if kinds <= {int, float}:
        return _V.FLOAT32
    if kinds == {str}:
        return _V.STRING
    if kinds == {list}:
        return _nested_spec([_infer_spec(v) for v in values])
    raise TypeError(f"cannot store a list of {', '.join(sorted(k.__name__ for k in kinds))} "
                    "as one GGUF array")


def _normalize_spec(spec):
    """A type spec with every type as a GGUFValueType."""
    if isinstance(spec, tuple):
        if len(spec) != 2 or _as_vtype(spec[0]) != _V.ARRAY:
            raise ValueError(f"bad type spec {spec!r}: a tuple must be (ARRAY, element spec)")
        return (_V.ARRAY, _normalize_spec(spec[1]))
    if isinstance(spec, list):
        return [_normalize_spec(s) for s in spec]
    return _as_vtype(spec)


def _pack_scalars(vtype, values):
    """The bytes of `values` as elements of fixed-size type `vtype`, range-checked."""
    if vtype == _V.BOOL:
        if not all(v is True or v is False or v in (0, 1) for v in values):
            raise ValueError(f"BOOL values must be True or False, got {values!r:.80}")
    elif vtype in _FLOATS:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{vtype.name} values must be numbers")
    else:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{vtype.name} values must be ints")
        lo, hi = _INT_RANGES[vtype]
        bad = [v for v in values if not lo <= v < hi]
        if bad:
            raise ValueError(f"{bad[0]} is out of range for {vtype.name}")
    try:
        return struct.pack(f"<{len(values)}{_SCALAR_FORMATS[vtype]}", *values)
    except (struct.error, OverflowError) as e:  # a float beyond FLOAT32's range
        raise ValueError(f"cannot store as {vtype.name}: {e}") from None


def _pack_string(s):
    if not isinstance(s, (str, bytes)):
        raise TypeError(f"STRING values must be str, got {type(s).__name__}")
    raw = _encode(s)
    return _U64.pack(len(raw)) + raw


def _pack_value(value, spec):
    """The bytes of a metadata value of type spec `spec` (without the leading type id)."""
    if isinstance(spec, tuple):
        return _pack_array(value, spec[1])
    if spec == _V.STRING:
        return _pack_string(value)
    if spec == _V.ARRAY:
        raise ValueError("an ARRAY value needs its element type (pass element_type)")
    return _pack_scalars(spec, [value])


def _pack_array(values, elem):
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"ARRAY values must be lists, got {type(values).__name__}")
    values = list(values)
    etype = _V.ARRAY if isinstance(elem, (tuple, list)) else elem
    head = _ARRAY_HEAD.pack(etype, len(values))
    if etype in _SCALARS:
        return head + _pack_scalars(etype, values)
    if etype == _V.STRING:
        return head + b"".join(_pack_string(s) for s in values)
    # arrays of arrays: one shared spec, one spec per sub-array, or bare ARRAY (infer each)
    if isinstance(elem, list):
        if len(elem) != len(values):
            raise ValueError(f"{len(elem)} element specs for {len(values)} sub-arrays")
        specs = elem
    elif isinstance(elem, tuple):
        specs = [elem] * len(values)
    else:
        specs = [_infer_spec(v) for v in values]
    if not all(isinstance(s, tuple) for s in specs):
        raise ValueError("an array of arrays can hold only arrays")
    return head + b"".join(_pack_array(v, s[1]) for v, s in zip(values, specs))


def _ggml_type_id(name, dtype):
    """The GGML type id of an engine dtype (or its name), a GGML type id, or a GGML type name."""
    if isinstance(dtype, str) and dtype.upper() in GGML_TYPE_IDS:
        return GGML_TYPE_IDS[dtype.upper()]
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in GGML_TYPES:
            raise ValueError(f"tensor {name!r}: unknown GGML type id {dtype}")
        return dtype
    d = dtypes.get_dtype(dtype)
    if d not in _GGML_TYPE_OF_DTYPE:
        raise ValueError(f"tensor {name!r}: dtype {d.name} has no GGML type")
    return _GGML_TYPE_OF_DTYPE[d]


class _PendingTensor:
    __slots__ = ("name", "type_id", "shape", "nbytes", "source")

    def __init__(self, name, type_id, shape, nbytes, source):
        self.name, self.type_id, self.shape, self.nbytes, self.source = (
            name, type_id, shape, nbytes, source)

    def info_bytes(self, offset):
        raw = _encode(self.name)
        dims = tuple(reversed(self.shape))  # GGUF lists dims innermost-first
        return b"".join((_U64.pack(len(raw)), raw, _U32.pack(len(dims)),
                         struct.pack(f"<{len(dims)}Q", *dims),
                         _TYPE_AND_OFFSET.pack(self.type_id, offset)))

    def data(self):
        """A buffer of the tensor's bytes, and what must stay alive while it is written. A lazy
        tensor is produced here, so only the one being written is in memory."""
        source = self.source
        if callable(source) and not isinstance(source, Tensor):
            source = source()
        if isinstance(source, Tensor):
            if _GGML_TYPE_OF_DTYPE.get(source.dtype) != self.type_id or \
                    tuple(source.shape) != self.shape:
                raise ValueError(f"tensor {self.name!r}: produced {source.dtype.name} "
                                 f"{tuple(source.shape)}, announced {GGML_TYPES[self.type_id][0]} "
                                 f"{self.shape}")
            t = source.cpu().contiguous()
            return ffi.buffer(ffi.cast("char *", t.data_ptr()), self.nbytes), t
        view = memoryview(source)
        if view.nbytes != self.nbytes:
            raise ValueError(f"tensor {self.name!r}: {view.nbytes} bytes given, shape "
                             f"{self.shape} of {GGML_TYPES[self.type_id][0]} needs {self.nbytes}")
        return view, source


class GGUFWriter:
    """Writes a GGUF (version 3) file the way llama.cpp expects: general.alignment recorded when
    it is not the default 32, every tensor at an aligned offset, the data section aligned, each
    tensor padded with zeros to the alignment.

    add() metadata and add_tensor() / add_tensor_bytes() / add_tensor_lazy() tensors in the order
    they should appear, then write(). Tensors are referenced, not copied, until write() streams
    them out one by one."""

    def __init__(self, path, alignment=DEFAULT_ALIGNMENT):
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) \
                or alignment >= 2 ** 32:
            raise ValueError(f"alignment {alignment!r} is not a power of two below 2**32")
        self.path = os.fspath(path)
        self.alignment = alignment
        self._metadata = {}  # key -> packed type id + value
        self._tensors = {}

    def add(self, key, value, vtype=None, element_type=None):
        """Adds metadata entry `key`.

        Without vtype the type is inferred: bool -> BOOL; int -> UINT32 when 0 <= v < 2**32 (what
        llama.cpp reads counts, sizes and token ids as), else INT64 (UINT64 for 2**63 <= v <
        2**64); float -> FLOAT32; str (or raw bytes) -> STRING; list -> ARRAY, its elements
        inferred the same way over all of them (ints and floats mixed -> FLOAT32).

        vtype is a GGUFValueType, its id or name ("UINT32"), or a full type spec as
        GGUFFile.metadata_types gives it, so that add(k, f.metadata[k], f.metadata_types[k])
        reproduces an entry exactly. A type spec is a GGUFValueType, or for an array the tuple
        (ARRAY, element spec); the element spec of an array of arrays is the sub-arrays' spec,
        a list of one spec per sub-array, or ARRAY to infer each. element_type gives an array's
        element spec alone (add(k, [1, 2], element_type="INT32"))."""
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r} is not a str")
        if key in self._metadata:
            raise ValueError(f"duplicate metadata key {key!r}")
        try:
            spec = self._spec(value, vtype, element_type)
            packed = _pack_value(value, spec)
        except (TypeError, ValueError) as e:  # say which entry (UnicodeEncodeError included)
            raise (TypeError if isinstance(e, TypeError) else ValueError)(
                f"metadata {key!r}: {e}") from None
        if key == ALIGNMENT_KEY and (spec != _V.UINT32 or value != self.alignment):
            raise ValueError(f"{ALIGNMENT_KEY} must be the UINT32 {self.alignment} this writer "
                             "was made with; pass alignment= to GGUFWriter instead")
        etype = _V.ARRAY if isinstance(spec, tuple) else spec
        self._metadata[key] = _pack_string(key) + _U32.pack(etype) + packed

    @staticmethod
    def _spec(value, vtype, element_type):
        if vtype is None and element_type is None:
            return _infer_spec(value)
        if vtype is None or (not isinstance(vtype, (tuple, list)) and
                             _as_vtype(vtype) == _V.ARRAY):
            if element_type is None:
                return (_V.ARRAY, _infer_element_spec(value))
            return (_V.ARRAY, _normalize_spec(element_type))
        if element_type is not None:
            raise ValueError("element_type is only for ARRAY values")
        if isinstance(vtype, list):
            raise ValueError(f"bad type spec {vtype!r}: a list only describes sub-arrays")
        return _normalize_spec(vtype)

    def add_tensor(self, name, tensor):
        """Adds an engine Tensor (any dtype with a GGML type; shape in PyTorch order)."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor {name!r}: expected a Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _GGML_TYPE_OF_DTYPE:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype.name} has no GGML type")
        self._add(name, _GGML_TYPE_OF_DTYPE[tensor.dtype], tensor.shape, tensor)

    def add_tensor_bytes(self, name, data, dtype, shape):
        """Adds a tensor from its raw bytes (any buffer). dtype is an engine dtype (or its name),
        or any GGML type id or name ("Q5_K") for copying tensors the engine cannot compute with."""
        entry = self._add(name, _ggml_type_id(name, dtype), shape, memoryview(data))
        try:
            entry.data()  # checks the size now, while the caller can still tell which tensor
        except ValueError:
            del self._tensors[name]
            raise

    def add_tensor_lazy(self, name, shape, dtype, produce):
        """Adds a tensor that `produce()` makes while write() runs (a Tensor of exactly this
        shape and dtype, or its bytes): converting or quantizing a model this way keeps one
        tensor in memory at a time. dtype is as for add_tensor_bytes."""
        if not callable(produce):
            raise TypeError(f"tensor {name!r}: produce must be callable")
        self._add(name, _ggml_type_id(name, dtype), shape, produce)

    def _add(self, name, type_id, shape, source):
        if not isinstance(name, str):
            raise TypeError(f"tensor name {name!r} is not a str")
        if len(_encode(name)) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {name!r} is longer than llama.cpp's "
                             f"{MAX_NAME_BYTES} bytes")
        if name in self._tensors:
            raise ValueError(f"duplicate tensor name {name!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) > MAX_DIMS or not all(s > 0 for s in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} is not 0 to {MAX_DIMS} "
                             "positive sizes")
        nbytes = _tensor_nbytes(type_id, shape)
        if nbytes is None:
            type_name, block_size, _ = GGML_TYPES[type_id]
            raise ValueError(f"tensor {name!r}: innermost dim {shape[-1]} of a {type_name} "
                             f"tensor is not a multiple of its block size {block_size}")
        self._tensors[name] = _PendingTensor(name, type_id, shape, nbytes, source)
        return self._tensors[name]

    def _head(self):
        """Header, metadata, tensor table and padding: everything before the tensor data."""
        metadata = dict(self._metadata)
        if self.alignment != DEFAULT_ALIGNMENT and ALIGNMENT_KEY not in metadata:
            metadata[ALIGNMENT_KEY] = (_pack_string(ALIGNMENT_KEY) + _U32.pack(_V.UINT32) +
                                       _U32.pack(self.alignment))
        parts = [_HEADER.pack(MAGIC, VERSION, len(self._tensors), len(metadata))]
        parts += metadata.values()
        offset = 0
        for t in self._tensors.values():
            parts.append(t.info_bytes(offset))
            offset += t.nbytes + _pad(t.nbytes, self.alignment)
        head = b"".join(parts)
        return head + bytes(_pad(len(head), self.alignment))

    def write(self):
        """Writes the file (through a temporary beside it, renamed into place when complete)."""
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(self._head())
                for t in self._tensors.values():
                    data, _keep = t.data()
                    f.write(data)
                    f.write(bytes(_pad(t.nbytes, self.alignment)))
                    del data, _keep
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def __repr__(self):
        return (f"GGUFWriter({self.path!r}, {len(self._metadata)} metadata, "
                f"{len(self._tensors)} tensors)")
