"""Model files, one per architecture, installed as inference_pio.models.

Each file declares its layers on top of inference_pio.nn and the engine's shared pieces, and
registers itself under the checkpoint's architecture name. The first architectures arrive with
the Qwen3 issue; until then this package holds no model."""
