"""Reading Hugging Face checkpoints (safetensors weights, memory-mapped, and config.json) and
reading and writing GGUF files."""
from .gguf import GGUFError, GGUFFile, GGUFTensorInfo, GGUFValueType, GGUFWriter
from .hf_config import architecture, load_hf_config, rope_theta
from .safetensors import CheckpointError, CheckpointWeights, SafetensorsFile, load_checkpoint

__all__ = ["CheckpointError", "CheckpointWeights", "SafetensorsFile", "load_checkpoint",
           "load_hf_config", "architecture", "rope_theta",
           "GGUFError", "GGUFFile", "GGUFTensorInfo", "GGUFValueType", "GGUFWriter"]
