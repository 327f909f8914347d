"""What a request asks for (SamplingParams) and what it gets back (RequestOutput)."""
import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / T) after
    top_k (0: off), top_p (1.0: off) and min_p (0.0: off) filtering. `seed` makes the draws of
    this request reproducible on the same device, whatever else is batched with it. Generation
    stops at max_tokens new tokens, at an end-of-sequence token of the model (unless
    ignore_eos), or at any of stop_token_ids; the stopping token is included in token_ids
    (and, when it is not a special token, in text).

    stop: a string or a list of strings. Generation stops as soon as the output text (the new
    text only, decoded as the tokens arrive, with skip_special_tokens) contains one of them,
    wherever the token boundaries fall; the text ends just before it (just after it with
    include_stop_str_in_output). As in vLLM, token_ids keep every generated token, the ones
    that completed the stop string included (the text after it in the last token is dropped).
    Stop strings need the model's tokenizer.
    n: independent samples of each prompt, run together as n sequences; sample i draws from its
    own stream (seeded from (seed, i): reproducible with a seed, and sample 0 draws what n=1
    draws). Greedy samples are allowed and identical."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    stop: list = field(default_factory=list)
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "must be an integer >= 0")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 turns it off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.include_stop_str_in_output, bool):
            bad("include_stop_str_in_output", "must be True or False")

    @property
    def greedy(self):
        return self.temperature == 0


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class CompletionOutput:
    """One of a request's n samples: its new tokens and their text. finish_reason is "stop" (an
    end or stop token, or a stop string) or "length" (max_tokens, or the model's context filled
    up); stop_reason names what stopped it: the stop string, or the stop_token_ids id (None for
    an end-of-sequence token of the model, and for "length"), as vLLM's."""
    index: int
    text: str
    token_ids: list
    finish_reason: str
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """One finished request: the new tokens and their text (the prompt is not repeated).
    outputs holds its n samples (CompletionOutput, by index); token_ids, text, finish_reason
    and stop_reason are the first sample's."""
    request_id: int
    prompt_token_ids: list
    token_ids: list
    text: str
    finish_reason: str
    stop_reason: int | str | None = None
    outputs: list = field(default_factory=list)
