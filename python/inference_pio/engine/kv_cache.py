"""The paged KV cache: per layer, one key and one value pool of fixed-size blocks, allocated
once when the engine starts (the memory is only touched as blocks fill up)."""
from .. import dtypes
from ..tensor import Tensor


class KVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device="cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype = dtypes.get_dtype(dtype)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self._layers = [(Tensor.empty(*shape, dtype=self.dtype, device=device),
                         Tensor.empty(*shape, dtype=self.dtype, device=device))
                        for _ in range(num_layers)]

    def layer(self, i):
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self._layers[i]

    @staticmethod
    def bytes_per_token(num_layers, num_kv_heads, head_dim, dtype):
        return 2 * num_layers * num_kv_heads * head_dim * dtypes.get_dtype(dtype).itemsize
