"""Reading Hugging Face checkpoints: safetensors weights (memory-mapped) and config.json."""
from .hf_config import architecture, load_hf_config, rope_theta
from .safetensors import CheckpointError, CheckpointWeights, SafetensorsFile, load_checkpoint

__all__ = ["CheckpointError", "CheckpointWeights", "SafetensorsFile", "load_checkpoint",
           "load_hf_config", "architecture", "rope_theta"]
