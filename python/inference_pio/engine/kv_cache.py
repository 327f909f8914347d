"""The paged KV cache: per layer, one key and one value pool of fixed-size blocks, allocated
once when the engine starts (the memory is only touched as blocks fill up)."""
from array import array

from .. import dtypes, ops
from ..tensor import Tensor


class KVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device="cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype = dtypes.get_dtype(dtype)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self._layers = [(Tensor.empty(*shape, dtype=self.dtype, device=device),
                         Tensor.empty(*shape, dtype=self.dtype, device=device))
                        for _ in range(num_layers)]
        self._all = [t for pair in self._layers for t in pair]

    def layer(self, i):
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self._layers[i]

    def copy_blocks(self, pairs):
        """Block dst becomes a copy of block src in every layer's k and v cache, for each
        (src, dst) of pairs (the block manager's copy-on-write): one library call for all of
        them, queued on the cache's device in order with the forwards."""
        if pairs:
            src = Tensor.frombuffer(array("i", [s for s, _ in pairs]), dtypes.int32)
            dst = Tensor.frombuffer(array("i", [d for _, d in pairs]), dtypes.int32)
            ops.kv_copy_blocks(self._all, src, dst)

    @staticmethod
    def bytes_per_token(num_layers, num_kv_heads, head_dim, dtype):
        return 2 * num_layers * num_kv_heads * head_dim * dtypes.get_dtype(dtype).itemsize
