"""The engine: LLM (the front door), SamplingParams, and the pieces under it (scheduler, block
manager, paged KV cache, flat batch, sampler)."""
from .beam_search import BeamHypothesis, BeamSearchOutput, BeamSearchParams
from .llm import LLM, StreamDelta
from .params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["BeamHypothesis", "BeamSearchOutput", "BeamSearchParams", "CompletionOutput", "LLM",
           "RequestOutput", "SamplingParams", "StreamDelta"]
