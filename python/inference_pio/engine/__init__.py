"""The engine: LLM (the front door), SamplingParams, and the pieces under it (scheduler, block
manager, paged KV cache, flat batch, sampler)."""
from .llm import LLM, StreamDelta
from .params import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StreamDelta"]
