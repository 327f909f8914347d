"""Reading safetensors checkpoints without the safetensors package.

A .safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data_offsets relative to the data section; optional "__metadata__"), then the raw
little-endian tensor bytes. We map the file read-only and hand out Tensors that view the mapped
bytes directly: loading a checkpoint copies nothing and costs page cache, not heap. Every header
is validated up front, so a damaged file fails at open with its path in the message instead of
producing garbage weights later.
"""
import json
import mmap
import os
import struct

from .. import dtypes
from .._lib import ffi
from ..tensor import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# BOOL is stored one byte per element (0/1), so it reads losslessly as uint8.
DTYPES = {"F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16,
          "I8": dtypes.int8, "I32": dtypes.int32, "I64": dtypes.int64,
          "U8": dtypes.uint8, "BOOL": dtypes.uint8}


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read; the message names the path."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path, name, entry, data_len):
    """(dtype, shape, begin, end) of one header entry, or CheckpointError."""
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"tensor {name!r}: header entry is not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise CheckpointError(path, f"tensor {name!r}: header entry lacks {field!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise CheckpointError(path, f"tensor {name!r}: unsupported dtype {code!r} "
                                    f"(supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise CheckpointError(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(path, f"tensor {name!r}: data_offsets {offsets!r} "
                                    "is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(path, f"tensor {name!r}: data_offsets {offsets} out of order")
    if end > data_len:
        raise CheckpointError(path, f"tensor {name!r}: data_offsets {offsets} beyond the data "
                                    f"section of {data_len} bytes")
    dtype = DTYPES[code]
    need = dtype.itemsize
    for n in shape:
        need *= n
    if end - begin != need:
        raise CheckpointError(path, f"tensor {name!r}: data_offsets {offsets} span {end - begin} "
                                    f"bytes, shape {shape} of {code} needs {need}")
    return dtype, tuple(shape), begin, end


class MappedFile:
    """Closing and context management of a file read through `self._mmap` (SafetensorsFile,
    GGUFFile)."""
    error = CheckpointError  # what a file that cannot be opened raises

    def _open(self, path):
        """The file opened for reading (self.path set; self._mmap still None)."""
        self.path, self._mmap = os.fspath(path), None
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            raise self.error(self.path, "no such file") from None
        except OSError as e:
            raise self.error(self.path, f"cannot open: {e.strerror or e}") from None

    def release(self, tensor):
        """Lets the process drop its pages of `tensor`'s bytes in the map (a tensor get()
        returned that is no longer used, e.g. after a converted copy replaced it). The map is
        read-only, so a page touched again is read back from the file: nothing is lost. Only
        pages wholly inside the tensor are released; other tensors are a no-op."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.is_cuda:
            return
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(self._mmap)))
        start = tensor.data_ptr() - base
        if not 0 <= start < len(self._mmap):
            return
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = min(start + tensor.nbytes, len(self._mmap)) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self):
        """Drops the mapping. Tensors still viewing it keep it exported; mmap refuses to unmap
        then, and the pages go away with the last such tensor instead."""
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(MappedFile):
    """One .safetensors file, memory-mapped read-only. get(name) returns a read-only Tensor
    viewing the mapping (zero-copy); it stays valid after close() as long as it is referenced."""

    def __init__(self, path):
        with self._open(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(self.path, f"file of {size} bytes is too short for the "
                                                 "8-byte header length")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(self.path, f"header length {header_len} is larger than the "
                                                 f"{size - 8} bytes after it")
            raw = f.read(header_len)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._data_start = 8 + header_len
        try:
            self._parse_header(raw, size - self._data_start)
        except CheckpointError:
            self.close()
            raise

    def _parse_header(self, raw, data_len):
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(self.path, f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(self.path, "__metadata__ is not a JSON object")
        self.metadata = dict(meta or {})
        self._entries = {name: _parse_entry(self.path, name, e, data_len)
                         for name, e in header.items()}
        spans = sorted((b, e, name) for name, (_, _, b, e) in self._entries.items() if e > b)
        for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise CheckpointError(self.path, f"tensors {prev!r} and {name!r} overlap")

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __len__(self):
        return len(self._entries)

    def get(self, name):
        if self._mmap is None:
            raise CheckpointError(self.path, "file is closed")
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, _ = self._entries[name]
        return Tensor.frombuffer(self._mmap, dtype, shape, offset=self._data_start + begin)

    def __repr__(self):
        return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors)"


class CheckpointWeights:
    """The weights of a Hugging Face checkpoint folder: one model.safetensors, or shards listed
    by model.safetensors.index.json. Shards are opened on first use and kept open. Iterating
    yields (name, Tensor) pairs, the form Module.load_weights takes."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self._files = {}
        if not os.path.isdir(self.folder):
            raise CheckpointError(self.folder, "no such checkpoint folder")
        index = os.path.join(self.folder, INDEX_FILE)
        single = os.path.join(self.folder, SINGLE_FILE)
        if os.path.exists(index):
            self._where = self._read_index(index)
        elif os.path.exists(single):
            self._where = dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            raise CheckpointError(self.folder, f"neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _read_index(self, index):
        try:
            with open(index, "rb") as f:
                doc = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(index, f"not valid JSON ({e})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(index, "no \"weight_map\" object of tensor name -> shard file")
        for shard in set(weight_map.values()):
            if not os.path.isfile(os.path.join(self.folder, shard)):
                raise CheckpointError(index, f"shard {shard!r} is missing from {self.folder}")
        return dict(weight_map)

    def _open(self, shard):
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(os.path.join(self.folder, shard))
        return self._files[shard]

    def names(self):
        return sorted(self._where)

    def __contains__(self, name):
        return name in self._where

    def __len__(self):
        return len(self._where)

    def __getitem__(self, name):
        shard = self._where[name]
        f = self._open(shard)
        if name not in f:
            raise CheckpointError(f.path, f"tensor {name!r} listed in {INDEX_FILE} "
                                          "is not in this shard")
        return f.get(name)

    def __iter__(self):
        for name in self.names():
            yield name, self[name]

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"CheckpointWeights({self.folder!r}, {len(self._where)} tensors)"


def load_checkpoint(folder):
    """The weights of the checkpoint folder (see CheckpointWeights)."""
    return CheckpointWeights(folder)
