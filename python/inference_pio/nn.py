"""Module and the common layers.

A Module registers tensors and submodules assigned as attributes, and names its parameters the
way checkpoints do (`model.layers.3.self_attn.q_proj.weight`), so a model file declares its
layers with the checkpoint's attribute names and `load_weights` matches them by name.
"""
from . import dtypes, ops
from .dtypes import get_dtype
from .tensor import Tensor


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_buffers", {})

    # ---- registration by attribute ----
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if name in self._buffers:
            self._buffers[name] = value
            return
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        self.__dict__.pop(name, None)
        if isinstance(value, Tensor):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only called when normal lookup fails
        for key in ("_parameters", "_modules", "_buffers"):
            d = self.__dict__.get(key)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name):
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        super().__delattr__(name)

    def register_buffer(self, name, tensor):
        """A tensor the module keeps (rotary tables, caches) that is not a checkpoint weight."""
        self._parameters.pop(name, None)
        self._buffers[name] = tensor

    def register_parameter(self, name, tensor):
        """Registers a parameter slot; None declares an optional weight (e.g. an absent bias)."""
        self._buffers.pop(name, None)
        self._parameters[name] = tensor

    # ---- traversal ----
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def _owner(self, name):
        """(module, attribute) that a dotted parameter name refers to."""
        *path, attr = name.split(".")
        m = self
        for part in path:
            m = m._modules[part]
        return m, attr

    # ---- weights ----
    def load_weights(self, weights, strict=True):
        """Loads (name, Tensor) pairs into the parameters of the same name.

        A weight replaces the parameter without a copy when its dtype and device already match
        (so memory-mapped checkpoint tensors are used in place); otherwise it is converted to the
        parameter's dtype and device. A block-quantized weight keeps its dtype: the kernels
        read the blocks directly. Raises KeyError for unknown or (with strict) missing names
        and ValueError for a shape that differs from the parameter's. Returns the loaded names."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            if name not in params:
                raise KeyError(f"unexpected weight {name!r}: {type(self).__name__} has no such parameter")
            p = params[name]
            if tuple(w.shape) != p.shape:
                raise ValueError(f"weight {name!r} has shape {list(w.shape)}, expected {list(p.shape)}")
            owner, attr = self._owner(name)
            owner._parameters[attr] = w.to(device=p.storage.device,
                                           dtype=None if w.dtype.is_quantized else p.dtype)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if strict and missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise KeyError(f"missing weights: {shown}")
        return loaded

    def to(self, device=None, dtype=None):
        """Converts every floating-point parameter and buffer in place; returns self."""
        for _, m in self.named_modules():
            for d in (m._parameters, m._buffers):
                for name, t in d.items():
                    if isinstance(t, Tensor):
                        d[name] = t.to(device=device, dtype=dtype if t.dtype.is_float else None)
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            lines.append("  " + f"({name}): {m!r}".replace("\n", "\n  "))
        return "\n".join(lines) + ")" if len(lines) > 1 else lines[0] + ")"


class ModuleList(Module):
    """Submodules named 0, 1, 2, ... like checkpoints' `layers.N`."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m):
        self._modules[str(len(self._modules))] = m

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Linear(Module):
    """y = x @ weight^T (+ bias); weight [out_features, in_features] as checkpoints store it.
    Parameters start uninitialised (allocated, not touched: a model built to be loaded costs no
    memory until its weights arrive)."""

    def __init__(self, in_features, out_features, bias=False, dtype=dtypes.float32, device="cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Tensor.empty(out_features, in_features, dtype=dtype, device=device)
        self.register_parameter("bias", Tensor.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x, out=None):
        return ops.matmul(x, self.weight, self.bias, out=out)

    @classmethod
    def concat(cls, parts):
        """One Linear whose output is the outputs of `parts` side by side (their weights stacked
        by rows): one product instead of several over the same input. None when the parts
        differ in input size, dtype, device or having a bias."""
        fused = cls._fused_like(parts)
        if fused is None:
            return None
        row = 0
        for p in parts:
            ops.copy(fused.weight.narrow(0, row, p.out_features), p.weight)
            if p.bias is not None:
                ops.copy(fused.bias.narrow(0, row, p.out_features), p.bias)
            row += p.out_features
        return fused

    @classmethod
    def interleave(cls, parts):
        """Like concat, with the parts' rows interleaved instead (row r of part i at r * len(parts)
        + i), so the output columns alternate between the parts (the layout of
        ops.rms_norm_swiglu's gate and up). None also when out_features differ."""
        fused = cls._fused_like(parts)
        if fused is None or len({p.out_features for p in parts}) != 1:
            return None
        n, k = parts[0].out_features, len(parts)
        for i, p in enumerate(parts):
            ops.copy(fused.weight.unflatten(0, (n, k)).narrow(1, i, 1), p.weight.unflatten(0, (n, 1)))
            if p.bias is not None:
                ops.copy(fused.bias.unflatten(0, (n, k)).narrow(1, i, 1), p.bias.unflatten(0, (n, 1)))
        return fused

    @classmethod
    def _fused_like(cls, parts):
        """An empty Linear with the parts' outputs together, or None when they cannot be fused."""
        first = parts[0]
        w = first.weight
        if any(p.in_features != first.in_features or p.weight.dtype != w.dtype or p.weight.device != w.device
               or (p.bias is None) != (first.bias is None) for p in parts):
            return None
        return cls(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                   dtype=w.dtype, device=w.device)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, dtype={self.weight.dtype}"


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, dtype=dtypes.float32, device="cpu"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Tensor.empty(num_embeddings, embedding_dim, dtype=dtype, device=device)  # uninitialised

    def forward(self, ids, out=None):
        return ops.embedding(self.weight, ids, out=out)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight.dtype}"


class RMSNorm(Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension. With `residual`, adds x into
    it first (in place) and normalises the sum: the pre-norm decoder's fused step."""

    def __init__(self, dim, eps=1e-6, dtype=dtypes.float32, device="cpu"):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = Tensor.full((dim,), 1.0, dtype=get_dtype(dtype), device=device)

    def forward(self, x, residual=None, out=None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, out=out)
        return ops.add_rms_norm(residual, x, self.weight, self.eps, out=out)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"
