"""Tensor: a typed, shaped, strided view of a block of CPU or GPU memory.

Views (reshape of contiguous data, transpose, permute, slicing, expand) share memory and change
only shape, strides and offset. Every op runs in libtensor_ops; a Tensor hands the library a
descriptor built once per tensor. CPU tensors have the buffer protocol (memoryview(t), bytes(t)).
"""
from array import array as _array

from . import dtypes
from ._buffer import BufferBase
from ._lib import check, ffi, lib
from .dtypes import DType, get_dtype

_CPU, _CUDA = lib.TO_CPU, lib.TO_CUDA


def parse_device(device):
    """("cpu" | "cuda" | "cuda:N") -> (device code, index)."""
    if isinstance(device, tuple):
        return device
    name, _, index = str(device).partition(":")
    if name == "cpu" and not index:
        return (_CPU, 0)
    if name == "cuda" and (not index or index.isdigit()):
        return (_CUDA, int(index or 0))
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")


def device_name(device):
    code, index = device
    return "cpu" if code == _CPU else f"cuda:{index}"


# While graph.OpGraph captures, the tensors whose descriptors reach the library are collected
# here: the recorded calls point into their memory, so the graph holds on to them.
_graph_tensors = None


class Storage:
    """A block of memory: allocated by the library (freed when unreferenced), or borrowed from a
    Python object with the buffer protocol (kept alive while the storage lives)."""

    __slots__ = ("ptr", "nbytes", "device", "readonly", "_owner")

    def __init__(self, ptr, nbytes, device, readonly=False, owner=None):
        self.ptr, self.nbytes, self.device, self.readonly, self._owner = ptr, nbytes, device, readonly, owner

    @classmethod
    def allocate(cls, nbytes, device):
        code, index = device
        out = ffi.new("void **")
        check(lib.to_alloc(code, index, nbytes, out))
        ptr = ffi.gc(out[0], lambda p: lib.to_free(code, index, p), size=nbytes)
        return cls(ffi.cast("char *", ptr), nbytes, device, owner=ptr)

    @classmethod
    def borrow(cls, obj):
        readonly = memoryview(obj).readonly
        buf = ffi.from_buffer("char[]", obj, require_writable=not readonly)
        return cls(ffi.cast("char *", buf), len(buf), (_CPU, 0), readonly, owner=buf)


def _contiguous_strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _norm_shape(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return shape


def _norm_dim(dim, ndim):
    if ndim == 0 or not -ndim <= dim < ndim:
        raise IndexError(f"dimension {dim} out of range for a tensor of rank {ndim}")
    return dim % ndim if ndim else 0


class Tensor(BufferBase):
    __slots__ = ("storage", "offset", "shape", "strides", "dtype", "_desc_cache")

    def __init__(self, storage, shape, strides, dtype, offset=0):
        self.storage = storage
        self.offset = offset  # bytes from storage.ptr to element [0, ...]
        self.shape = tuple(shape)
        self.strides = tuple(strides)  # in elements
        self.dtype = dtype
        self._desc_cache = None

    # ---- construction ----
    @classmethod
    def empty(cls, *shape, dtype=dtypes.float32, device="cpu"):
        shape, dtype, device = _norm_shape(shape), get_dtype(dtype), parse_device(device)
        storage = Storage.allocate(dtype.nbytes(_numel(shape)), device)
        return cls(storage, shape, _contiguous_strides(shape), dtype)

    @classmethod
    def full(cls, shape, value, dtype=dtypes.float32, device="cpu"):
        t = cls.empty(shape, dtype=dtype, device=device)
        return t.fill_(value)

    @classmethod
    def zeros(cls, *shape, dtype=dtypes.float32, device="cpu"):
        return cls.full(_norm_shape(shape), 0.0, dtype=dtype, device=device)

    @classmethod
    def frombuffer(cls, buffer, dtype, shape=None, offset=0, copy=False):
        """A CPU tensor over `buffer` (bytes, bytearray, mmap, memoryview, array, ...) without
        copying, unless copy=True. A read-only buffer gives a read-only tensor."""
        dtype = get_dtype(dtype)
        storage = Storage.borrow(buffer)
        avail = storage.nbytes - offset
        if offset < 0 or avail < 0:
            raise ValueError(f"offset {offset} outside a buffer of {storage.nbytes} bytes")
        if shape is None:
            if dtype.is_quantized:
                raise ValueError(f"a {dtype.name} tensor needs an explicit shape")
            if avail % dtype.itemsize:
                raise ValueError(f"buffer of {avail} bytes is not a whole number of {dtype.name} elements")
            shape = (avail // dtype.itemsize,)
        shape = _norm_shape(shape)
        need = dtype.nbytes(_numel(shape))
        if need > avail:
            raise ValueError(f"shape {shape} of {dtype.name} needs {need} bytes, the buffer has {avail}")
        t = cls(storage, shape, _contiguous_strides(shape), dtype, offset)
        return t.clone() if copy else t

    # ---- facts ----
    @property
    def ndim(self):
        return len(self.shape)

    @property
    def device(self):
        return device_name(self.storage.device)

    @property
    def is_cuda(self):
        return self.storage.device[0] == _CUDA

    @property
    def readonly(self):
        return self.storage.readonly

    def numel(self):
        return _numel(self.shape)

    def element_size(self):
        return self.dtype.itemsize

    @property
    def nbytes(self):
        return self.dtype.nbytes(self.numel())

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[_norm_dim(dim, self.ndim)]

    def is_contiguous(self):
        return all(n == 1 or s == e for n, s, e in zip(self.shape, self.strides, _contiguous_strides(self.shape)))

    def data_ptr(self):
        return int(ffi.cast("uintptr_t", self.storage.ptr)) + self.offset

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self):
        head = f"Tensor(shape={list(self.shape)}, dtype={self.dtype.name}, device={self.device}"
        if self.numel() <= 16:
            return head + f", data={self.tolist()})"
        return head + ")"

    # ---- the C descriptor ----
    @property
    def _desc(self):
        if _graph_tensors is not None:  # an OpGraph is capturing: it must keep this tensor alive
            _graph_tensors.append(self)
        d = self._desc_cache
        if d is None:
            d = ffi.new("to_tensor *")
            d.data = self.storage.ptr + self.offset
            d.nbytes = self.storage.nbytes - self.offset
            d.dtype = self.dtype.code
            d.device, d.device_index = self.storage.device
            d.ndim = len(self.shape)
            for i, (n, s) in enumerate(zip(self.shape, self.strides)):
                d.shape[i] = n
                d.strides[i] = s
            self._desc_cache = d
        return d

    def _buffer_info(self):
        if self.is_cuda:
            raise BufferError("a CUDA tensor has no host buffer; use .cpu() first")
        if self.dtype.is_quantized:
            raise BufferError(f"a {self.dtype.name} tensor has no element buffer; convert it with .float()")
        size = self.dtype.itemsize
        return (self.data_ptr(), self.readonly, self.dtype.format, size, self.shape,
                tuple(s * size for s in self.strides))

    # ---- views ----
    def _view(self, shape, strides, offset_elems=0):
        return Tensor(self.storage, shape, strides, self.dtype, self.offset + self.dtype.nbytes(offset_elems))

    def _infer_shape(self, shape):
        shape = list(shape)
        if shape.count(-1) > 1:
            raise ValueError("only one dimension can be -1")
        known = _numel([s for s in shape if s != -1])
        if -1 in shape:
            if known == 0 or self.numel() % known:
                raise ValueError(f"cannot reshape {list(self.shape)} into {shape}")
            shape[shape.index(-1)] = self.numel() // known
        if _numel(shape) != self.numel():
            raise ValueError(f"cannot reshape {list(self.shape)} ({self.numel()} elements) into {shape}")
        return tuple(shape)

    def view(self, *shape):
        shape = self._infer_shape(_norm_shape_allow_neg(shape))
        if not self.is_contiguous():
            raise ValueError("view() needs a contiguous tensor; use reshape() or contiguous()")
        return self._view(shape, _contiguous_strides(shape))

    def reshape(self, *shape):
        """A view when the data is contiguous, else a contiguous copy."""
        return (self if self.is_contiguous() else self.contiguous()).view(*shape)

    def flatten(self):
        return self.reshape(-1)

    def transpose(self, d0, d1):
        d0, d1 = _norm_dim(d0, self.ndim), _norm_dim(d1, self.ndim)
        order = list(range(self.ndim))
        order[d0], order[d1] = order[d1], order[d0]
        return self.permute(*order)

    def permute(self, *dims):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        dims = [_norm_dim(d, self.ndim) for d in dims]
        if sorted(dims) != list(range(self.ndim)):
            raise ValueError(f"permute({dims}) is not a permutation of {self.ndim} dimensions")
        return self._view(tuple(self.shape[d] for d in dims), tuple(self.strides[d] for d in dims))

    @property
    def T(self):
        if self.ndim != 2:
            raise ValueError("T needs a 2-d tensor; use transpose() or permute()")
        return self.transpose(0, 1)

    def unsqueeze(self, dim):
        dim = dim % (self.ndim + 1) if -self.ndim - 1 <= dim <= self.ndim else None
        if dim is None:
            raise IndexError("unsqueeze dimension out of range")
        stride = self.strides[dim] * self.shape[dim] if dim < self.ndim else 1
        return self._view(self.shape[:dim] + (1,) + self.shape[dim:], self.strides[:dim] + (stride,) + self.strides[dim:])

    def squeeze(self, dim):
        dim = _norm_dim(dim, self.ndim)
        if self.shape[dim] != 1:
            raise ValueError(f"cannot squeeze dimension {dim} of size {self.shape[dim]}")
        return self._view(self.shape[:dim] + self.shape[dim + 1:], self.strides[:dim] + self.strides[dim + 1:])

    def expand(self, *shape):
        """Broadcast to `shape` (size-1 dimensions become stride-0; -1 keeps a size)."""
        shape = _norm_shape_allow_neg(shape)
        if len(shape) < self.ndim:
            raise ValueError(f"cannot expand {list(self.shape)} to fewer dimensions {list(shape)}")
        lead = len(shape) - self.ndim
        new_shape, new_strides = [], []
        for i, n in enumerate(shape):
            if i < lead:
                if n < 0:
                    raise ValueError("-1 is not allowed for a new leading dimension")
                new_shape.append(n)
                new_strides.append(0)
                continue
            have, stride = self.shape[i - lead], self.strides[i - lead]
            if n == -1 or n == have:
                new_shape.append(have)
                new_strides.append(stride)
            elif have == 1:
                new_shape.append(n)
                new_strides.append(0)
            else:
                raise ValueError(f"cannot expand {list(self.shape)} to {list(shape)}")
        return self._view(tuple(new_shape), tuple(new_strides))

    def unflatten(self, dim, sizes):
        """Dimension `dim` split into `sizes` (whose product is its size): a view whatever the
        strides (a column slice of a fused projection's output becomes [T, heads, head_dim])."""
        dim = _norm_dim(dim, self.ndim)
        sizes = tuple(int(n) for n in sizes)
        if _numel(sizes) != self.shape[dim]:
            raise ValueError(f"unflatten: sizes {list(sizes)} do not multiply to {self.shape[dim]}")
        strides, step = [], self.strides[dim]
        for n in reversed(sizes):
            strides.insert(0, step)
            step *= n
        return self._view(self.shape[:dim] + sizes + self.shape[dim + 1:],
                          self.strides[:dim] + tuple(strides) + self.strides[dim + 1:])

    def narrow(self, dim, start, length):
        dim = _norm_dim(dim, self.ndim)
        if not (0 <= start and length >= 0 and start + length <= self.shape[dim]):
            raise IndexError(f"narrow({dim}, {start}, {length}) outside size {self.shape[dim]}")
        shape = list(self.shape)
        shape[dim] = length
        return self._view(tuple(shape), self.strides, start * self.strides[dim])

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            index = (index,)
        if sum(1 for i in index if i is Ellipsis) > 1:
            raise IndexError("only one Ellipsis allowed")
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        if consumed > self.ndim:
            raise IndexError(f"too many indices ({consumed}) for a tensor of rank {self.ndim}")
        if Ellipsis in index:
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (self.ndim - consumed) + index[k + 1:]
        shape, strides, offset, dim = [], [], 0, 0
        for i in index:
            if i is None:
                shape.append(1)
                strides.append(0)
                continue
            n, s = self.shape[dim], self.strides[dim]
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step <= 0:
                    raise ValueError("slices need a positive step")
                shape.append(max(0, (stop - start + step - 1) // step))
                strides.append(s * step)
                offset += start * s if shape[-1] else 0
            else:
                i = int(i)
                if not -n <= i < n:
                    raise IndexError(f"index {i} out of range for dimension {dim} of size {n}")
                offset += (i % n) * s
            dim += 1
        shape += self.shape[dim:]
        strides += self.strides[dim:]
        return self._view(tuple(shape), tuple(strides), offset)

    def __setitem__(self, index, value):
        target = self[index]
        if isinstance(value, Tensor):
            target.copy_(value.expand(*target.shape) if value.shape != target.shape else value)
        else:
            target.fill_(value)

    # ---- copies and conversion ----
    def _check_writable(self):
        if self.readonly:
            raise ValueError("tensor is read-only (it views a read-only buffer)")

    def copy_(self, src):
        """Copies src into self (converting dtype; across devices for same-dtype contiguous data)."""
        self._check_writable()
        if src.shape != self.shape:
            src = src.expand(*self.shape)
        check(lib.to_copy(self._desc, src._desc))
        return self

    def fill_(self, value):
        self._check_writable()
        check(lib.to_fill(self._desc, float(value)))
        return self

    def clone(self):
        return Tensor.empty(self.shape, dtype=self.dtype, device=self.storage.device).copy_(self)

    def contiguous(self):
        return self if self.is_contiguous() else self.clone()

    def to(self, device=None, dtype=None):
        """A tensor on `device` with `dtype`; self when both already match."""
        dtype = self.dtype if dtype is None else get_dtype(dtype)
        device = self.storage.device if device is None else parse_device(device)
        if dtype is self.dtype and device == self.storage.device:
            return self
        src = self
        if device != self.storage.device:
            # cross-device copies move bytes as they are: convert where the data is first
            src = src.to(dtype=dtype).contiguous()
        return Tensor.empty(self.shape, dtype=dtype, device=device).copy_(src)

    def cpu(self):
        return self.to("cpu")

    def cuda(self, index=0):
        return self.to(f"cuda:{index}")

    def float(self):
        return self.to(dtype=dtypes.float32)

    def tolist(self):
        t = self
        if t.dtype in (dtypes.bfloat16, dtypes.float16) or t.dtype.is_quantized:  # no buffer format
            t = t.to(dtype=dtypes.float32)
        t = t.cpu().contiguous()
        if t.numel() == 0:
            return _empty_nested(t.shape)
        return memoryview(t).tolist()

    def tolist_async(self):
        """Starts reading the values back to the host without waiting for the GPU to finish
        what is queued after (to_readback_start); returns a Readback whose result() is what
        tolist() gives now. On the CPU the values are read at once."""
        t = self
        if t.dtype in (dtypes.bfloat16, dtypes.float16) or t.dtype.is_quantized:  # no buffer format
            t = t.to(dtype=dtypes.float32)
        return Readback(t.contiguous())

    def item(self):
        if self.numel() != 1:
            raise ValueError(f"item() needs exactly one element, the tensor has {self.numel()}")
        return self.reshape(()).tolist()

    # ---- arithmetic (see ops.py for the full set) ----
    def __add__(self, other):
        from . import ops
        return ops.add(self, other)

    def __mul__(self, other):
        from . import ops
        return ops.mul(self, other)

    __radd__ = __add__
    __rmul__ = __mul__


class Readback:
    """A tensor's values on their way to the host (Tensor.tolist_async). result() waits for this
    copy only (not for the work queued on the GPU after it), returns the values as tolist()
    would, and raises an error the GPU recorded before the copy (a bad index or logits row)."""

    __slots__ = ("_src", "_handle", "_result", "_error")

    def __init__(self, src):
        self._handle = None  # (__del__ runs even when the start below fails)
        handle = ffi.new("void **")
        check(lib.to_readback_start(src._desc, handle))
        # src: the dtype and shape of the result (on a GPU its memory may be reused meanwhile:
        # a later write to it is queued after the copy)
        self._src, self._handle, self._result, self._error = src, handle[0], None, None

    def result(self):
        if self._handle is not None:
            handle, self._handle = self._handle, None  # the wait gives it back, even on an error
            buf = bytearray(self._src.nbytes)
            try:
                check(lib.to_readback_wait(handle, ffi.from_buffer(buf), len(buf)))
            except Exception as e:
                self._error = e
            else:
                self._result = Tensor.frombuffer(buf, self._src.dtype, self._src.shape).tolist()
            self._src = None
        if self._error is not None:
            raise self._error
        return self._result

    def release(self):
        """Gives the read back unread (an error it would have raised stays for a later wait)."""
        if self._handle is not None:
            handle, self._handle, self._src = self._handle, None, None
            check(lib.to_readback_release(handle))

    def __del__(self):
        if self._handle is not None:
            lib.to_readback_release(self._handle)
            self._handle = None


def _norm_shape_allow_neg(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(int(s) for s in shape)


def _empty_nested(shape):
    if not shape or shape[0] == 0:
        return []
    return [_empty_nested(shape[1:]) for _ in range(shape[0])]


def _shape_of(data):
    """The shape a nested sequence claims along its first elements."""
    shape = []
    while isinstance(data, (list, tuple)):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    return shape


def _flatten(data, shape, depth, out):
    """Appends the scalars of `data` to out, checking that it has exactly `shape`."""
    if depth == len(shape):
        if isinstance(data, (list, tuple)):
            raise ValueError("ragged nested sequence: mixed scalars and sequences")
        out.append(data)
        return
    if not isinstance(data, (list, tuple)) or len(data) != shape[depth]:
        raise ValueError("ragged nested sequence: every row must have the same length")
    for x in data:
        _flatten(x, shape, depth + 1, out)


def tensor(data, dtype=None, device="cpu"):
    """A tensor from a (nested) list/tuple of numbers, a number, or another Tensor.
    The dtype defaults to float32 when any value is a float, else int64."""
    if isinstance(data, Tensor):
        return data.to(device=device, dtype=dtype).clone()
    shape, flat = _shape_of(data), []
    _flatten(data, shape, 0, flat)
    if dtype is None:
        dtype = dtypes.float32 if any(isinstance(x, float) for x in flat) else dtypes.int64
    dtype = get_dtype(dtype)
    if dtype.is_float:
        carrier, code = dtypes.float32, "f"
    else:
        carrier, code = dtypes.int64, "q"
        if any(isinstance(x, float) for x in flat):
            raise TypeError(f"float values given for integer dtype {dtype.name}")
    try:
        buf = _array(code, flat)
    except (TypeError, OverflowError) as e:
        raise TypeError(f"cannot make a {dtype.name} tensor from these values: {e}") from None
    t = Tensor.frombuffer(buf, carrier, shape) if flat else Tensor.empty(shape, dtype=carrier)
    return t.to(device=device, dtype=dtype) if (dtype is not carrier or device != "cpu") else t.clone()


__all__ = ["Tensor", "Storage", "tensor", "parse_device", "DType"]
