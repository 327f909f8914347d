"""What a request asks for (SamplingParams) and what it gets back (RequestOutput)."""
import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / T) after
    top_k (0: off), top_p (1.0: off) and min_p (0.0: off) filtering. `seed` makes the draws of
    this request reproducible on the same device, whatever else is batched with it.

    Logits processors (all off by default), in the order they run over each row (transformers'
    generate order, _get_logits_processor in generation/utils.py, with presence/frequency where
    vLLM puts them), on a copy of the model's logits:
      1. logit_bias {token id: value} added (one-token SequenceBiasLogitsProcessor; -inf bans);
      2. repetition_penalty (1.0: off) over the prompt and the generated tokens, each distinct
         token once: logit < 0 multiplied, else divided (RepetitionPenaltyLogitsProcessor);
      3. presence_penalty, frequency_penalty (0.0: off; OpenAI's, in [-2, 2]) over the generated
         tokens: logit -= frequency_penalty * count + presence_penalty * (count > 0);
      4. no_repeat_ngram_size (0: off): a token that would repeat an n-gram of the prompt +
         generated tokens gets -inf (NoRepeatNGramLogitsProcessor);
      5. min_tokens (0: off): the end-of-sequence and stop_token_ids get -inf until min_tokens
         new tokens exist (MinNewTokensLengthLogitsProcessor; no ban with ignore_eos on EOS);
    greedy rows then take the argmax; sampled rows go through temperature, top_k (keeps the
    tokens tied with the k-th, as transformers), top_p, min_p and typical_p (1.0: off;
    TypicalLogitsWarper with min_tokens_to_keep=1), in that order, and draw.
    logprobs (None: off; N >= 0): every generated token gets its logprob and the N most likely
    alternatives', taken from the model's raw distribution, log_softmax of the logits before any
    processor, temperature or filter (vLLM's default, what OpenAI-compatible servers report):
    RequestOutput.logprobs and .cumulative_logprob. Generation
    stops at max_tokens new tokens, at an end-of-sequence token of the model (unless
    ignore_eos), or at any of stop_token_ids; the stopping token is included in token_ids
    (and, when it is not a special token, in text).

    stop: a string or a list of strings. Generation stops as soon as the output text (the new
    text only, decoded as the tokens arrive, with skip_special_tokens) contains one of them,
    wherever the token boundaries fall; the text ends just before it (just after it with
    include_stop_str_in_output). As in vLLM, token_ids keep every generated token, the ones
    that completed the stop string included (the text after it in the last token is dropped).
    Stop strings need the model's tokenizer.
    n: independent samples of each prompt, run together as n sequences that share the prompt's
    KV cache blocks (it is prefilled once: LLMEngine.add_samples); sample i draws from its
    own stream (seeded from (seed, i): reproducible with a seed, and sample 0 draws what n=1
    draws). Greedy samples are allowed and identical."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    # ---- logits processors and logprobs (see the docstring) ----
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    # ----
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
        self._check_processors(bad)

    @property
    def greedy(self):
        return self.temperature == 0

    def _check_processors(self, bad):
        """Validates (and normalises) the logits processors' and logprobs' fields."""
        if not _is_real(self.typical_p) or not 0 < self.typical_p <= 1:
            bad("typical_p", "must be in (0, 1]")
        if not _is_real(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a finite number > 0 (1.0 turns it off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_real(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2] (0.0 turns it off)")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", "must be an integer >= 0 (0 turns it off)")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be an integer in [0, max_tokens = {self.max_tokens}]")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "must be None or an integer >= 0 (the alternatives per token)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a dict {token id: bias} or None")
            bias = {}
            for k, v in self.logit_bias.items():
                tid = int(k) if isinstance(k, str) and k.strip().isdigit() else k  # JSON keys are strings
                if not _is_int(tid) or tid < 0:
                    bad("logit_bias", f"has key {k!r}: token ids must be integers >= 0")
                if not _is_real(v) or not (math.isfinite(v) or v == -math.inf):
                    bad("logit_bias", f"has value {v!r} for token {tid}: biases must be finite or -inf")
                bias[tid] = bias.get(tid, 0.0) + float(v)
            self.logit_bias = bias

    @property
    def needs_history(self):
        """Whether the processors read the tokens so far (penalties, the n-gram block)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.no_repeat_ngram_size > 0)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class CompletionOutput:
    """One of a request's n samples: its new tokens and their text. finish_reason is "stop" (an
    end or stop token, or a stop string) or "length" (max_tokens, or the model's context filled
    up); stop_reason names what stopped it: the stop string, or the stop_token_ids id (None for
    an end-of-sequence token of the model, and for "length"), as vLLM's. logprobs and
    cumulative_logprob: as RequestOutput's, this sample's."""
    index: int
    text: str
    token_ids: list
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: list | None = None
    cumulative_logprob: float | None = None


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
    # with SamplingParams.logprobs = N: per generated token a dict {token id: logprob}, the chosen
    # token first, then the N most likely (raw log_softmax, see SamplingParams); and the sum of
    # the chosen tokens' logprobs. None without. (The first sample's; each CompletionOutput has its own.)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
