"""LLM: the front door. Loads a checkpoint folder (model, tokenizer, chat template, generation
config), starts an engine over it, and offers generate / stream / chat / logits."""
import os
from dataclasses import dataclass

from .. import dtypes
from ..io.hf_config import eos_token_ids, load_hf_config
from ..tokenizer import CheckpointTokenizer, GGUFTokenizer
from .beam_search import BeamHypothesis, BeamSearchOutput, BeamSearchParams
from .llm_engine import LLMEngine
from .loader import load_model, resolve_dtype
from .params import CompletionOutput, RequestOutput, SamplingParams
from .sequence import Status


@dataclass
class StreamDelta:
    """One step of a streamed request: the token produced and the text it settled. The text is ""
    while a multi-byte character is still partial, and text that could still be the start of a
    stop string is held back until that is resolved (never sent if it becomes one). The last
    delta of a sample has finish_reason and stop_reason set. prompt_index: which prompt of the
    stream() call; sample_index: which of its n samples. logprobs (with SamplingParams.logprobs):
    this token's entry of RequestOutput.logprobs, {token id: logprob}, the chosen one first."""
    token_id: int
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_index: int = 0
    sample_index: int = 0
    logprobs: dict | None = None


def _kv_dtype(model, name):
    """The KV cache dtype LLM(kv_cache_dtype=name) means for `model`. For "auto" with quantized
    matrices, float16 halves the bytes attention reads per decode step against float32 (SmolLM2
    Q4_1 decode 3-9 % faster in alternating rounds) at float16 rounding of keys and values."""
    if name != "auto":
        return resolve_dtype(name, {})
    quantized = any(p.dtype.is_quantized for p in model.parameters())
    return dtypes.float16 if quantized and model.dtype is dtypes.float32 else model.dtype


class LLM:
    """A model ready to generate.

    model: a Hugging Face checkpoint folder or a GGUF file. device: "cpu" (or "cuda" where built
    with CUDA). dtype: the float weights' and KV cache's dtype, "auto" (the checkpoint's; float32
    for quantized GGUF files), "bfloat16", "float16" or "float32"; activations are float32 on the
    CPU. quantization: None, or a block type ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k") the weight
    matrices are quantized to while loading (block-quantized GGUF weights are used as stored). max_model_len: longest sequence (prompt + output);
    kv_cache_tokens: size of the paged KV cache pool shared by all running sequences (memory is
    reserved, and only touched as it fills). max_num_seqs / max_num_batched_tokens: the
    scheduler's limits per step (a longer prompt is prefilled in chunks of the latter; default
    512 on the CPU, where a step's time grows with its tokens and a long prefill would hold the
    decoding sequences back, 4096 on a GPU, whose products only reach their speed at thousands of
    rows: 32 prompts of 128 tokens are then one step instead of eight).
    enforce_eager: run every step op by op instead of replaying captured decode graphs.
    overlap: launch each decode step before the previous one's tokens are read back, so that the
    GPU never waits for the host between steps (engine/llm_engine.py); "auto" is on for a GPU
    unless enforce_eager, True runs the same code path on the CPU too.
    kv_cache_dtype: "float32", "bfloat16", "float16", or "auto": float16 when the weight matrices
    are block-quantized and the other weights float32 (quantized GGUF files, or `quantization`
    on a float32 checkpoint), as llama.cpp's cache; otherwise the float weights' dtype."""

    def __init__(self, model, device="cpu", dtype="auto", quantization=None, max_model_len=None,
                 kv_cache_tokens=None, block_size=16, max_num_seqs=32, max_num_batched_tokens=None,
                 enforce_eager=False, progress=None, kv_cache_dtype="auto", overlap="auto"):
        self.path = os.fspath(model)
        self.model, self.config = load_model(self.path, dtype, device, progress, quantization)
        self.tokenizer, generation_config = _tokenizer_and_generation_config(self.path, self.model)
        eos = eos_token_ids(generation_config, self.config)
        for tid in self.tokenizer.eos_token_ids if self.tokenizer is not None else []:
            if tid not in eos:
                eos.append(tid)
        limit = self.model.config.max_position_embeddings
        max_model_len = min(limit, 8192) if max_model_len is None else max_model_len
        if not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in 1..{limit} (the model's max_position_embeddings)")
        kv_cache_tokens = max(max_model_len, 8192) if kv_cache_tokens is None else kv_cache_tokens
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 512 if self.model.device == "cpu" else 4096
        self.engine = LLMEngine(self.model, eos, max_model_len, kv_cache_tokens, block_size,
                                max_num_seqs, max_num_batched_tokens, use_graphs=not enforce_eager,
                                kv_dtype=_kv_dtype(self.model, kv_cache_dtype), overlap=overlap,
                                detokenizer=self.tokenizer.incremental_decoder if self.tokenizer else None)

    @property
    def eos_token_ids(self):
        return self.engine.eos_ids

    # ---- prompts ----
    def _ids(self, prompt):
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        return list(prompt)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer (no tokenizer.json, or no tokenizer.ggml.* "
                             "metadata in a GGUF file): pass token ids instead of text")
        return self.tokenizer

    def _text(self, ids, params):
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **template_kwargs):
        """The prompt text the checkpoint's chat template makes of a conversation."""
        return self._need_tokenizer().apply_chat_template(messages, add_generation_prompt, tools,
                                                          **template_kwargs)

    # ---- generation ----
    def generate(self, prompts, sampling_params=None):
        """Completions of one prompt or a list of prompts (each text or token ids), all run
        together through the engine, the n samples of each as n sequences. sampling_params: one
        for all, or a list with one per prompt. Returns a list of RequestOutput in prompt order.
        A refused prompt (empty, too long, ...) raises before anything runs."""
        prompts, params = self._requests(prompts, sampling_params)
        groups = []
        try:
            self._add(prompts, params, groups)
            while self.engine.has_unfinished():
                self.engine.step()
        finally:
            self._abandon(groups)
        return [self._output(g) for g in groups]

    def stream(self, prompts, sampling_params=None):
        """Yields a StreamDelta per generated token as it is produced, of one prompt (text or
        token ids) or of a list of prompts run together through the engine, every sample of
        each (a delta's prompt_index and sample_index say whose token it is; one sample's deltas
        come in order, the samples' interleaved as the steps produce them). sampling_params: as
        for generate. Text never ends in a broken UTF-8 character, and text that may be the start
        of a stop string is held until resolved: one sample's delta texts add up to its
        generate() text. Closing the generator early aborts its requests."""
        prompts, params = self._requests(prompts, sampling_params)
        groups, sent = [], {}
        try:
            self._add(prompts, params, groups, text=True)
            tags = {seq: (p, seq.index) for p, group in enumerate(groups) for seq in group}
            while any(seq.status is not Status.FINISHED for seq in tags):
                for seq, tid in self.engine.step():
                    if seq not in tags:
                        continue
                    text = ""
                    if seq.output is not None:
                        end = seq.output.settled()
                        text, sent[seq] = seq.output.text[sent.get(seq, 0):end], end
                    done = seq.status is Status.FINISHED
                    yield StreamDelta(tid, text, seq.finish_reason if done else None,
                                      seq.stop_reason if done else None, *tags[seq],
                                      seq.logprobs[-1] if seq.logprobs else None)
        finally:
            self._abandon(groups)  # and read back the step launched behind the last one

    def _requests(self, prompts, params, kind=SamplingParams):
        """(prompts as token id lists, one `kind` of params per prompt) of generate's, stream's or
        beam_search's arguments: one prompt (text or ids) or a list; one params (None: the
        defaults) or a list with one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        return [self._ids(p) for p in prompts], _per_prompt(params, len(prompts), kind)

    def _add(self, prompts, params, groups, text=False):
        """Adds each prompt's n samples to the engine (LLMEngine.add_samples: the prompt is
        prefilled once for all of them), a list of sequences per prompt appended to `groups` as
        they go (so that _abandon finds them if a later prompt is refused)."""
        for ids, sp in zip(prompts, params):
            group = []
            groups.append(group)
            group.extend(self.engine.add_samples(ids, sp, text))

    def _abandon(self, groups):
        """An interrupted call leaves no request behind in the engine, nor a step in flight."""
        for group in groups:
            for seq in group:
                if seq.status is not Status.FINISHED:
                    self.engine.abort(seq)
        self.engine.drain()

    def _output(self, group):
        outs = [CompletionOutput(s.index, self._seq_text(s), s.completion_ids, s.finish_reason, s.stop_reason,
                                 s.logprobs, s.cumulative_logprob) for s in group]
        first, c = group[0], outs[0]
        return RequestOutput(first.request_id, first.token_ids[:first.num_prompt_tokens], c.token_ids,
                             c.text, c.finish_reason, c.stop_reason, outs, c.logprobs, c.cumulative_logprob)

    def _seq_text(self, seq):
        if seq.output is not None:  # decoded as it ran (and cut at a stop string)
            return seq.output.text
        return self._text(seq.completion_ids, seq.params)

    def beam_search(self, prompts, params=None):
        """Beam search continuations of one prompt or a list of prompts (text or token ids): a
        list of BeamSearchOutput in prompt order, each with params.num_return_sequences
        hypotheses (token_ids, text, score, finish_reason), best first. params: one
        BeamSearchParams for all, or a list with one per prompt. Every prompt's result is
        transformers' generate(num_beams=...) on that prompt alone (engine/beam_search.py); all
        run together through the engine, their beams rows of one batched forward, sharing
        their prompt's KV cache blocks. Separate from generate(), whose outputs are one
        completion each: a beam search returns several scored hypotheses."""
        prompts, params = self._requests(prompts, params, BeamSearchParams)
        reqs = [self.engine.add_beam_request(p, bp) for p, bp in zip(prompts, params)]
        try:
            while not all(r.done for r in reqs):
                self.engine.step()
        finally:
            for r in reqs:  # an interrupted call leaves no request behind in the engine
                self.engine.beams.abort(r)
            self.engine.drain()
        return [BeamSearchOutput(r.request_id, r.prompt_ids,
                                 [BeamHypothesis(ids, self._text(ids, r.params), score, reason)
                                  for score, ids, reason in r.hypotheses()]) for r in reqs]

    def chat(self, messages, sampling_params=None, tools=None, **template_kwargs):
        """The assistant's reply to a conversation (a list of {"role", "content"} dicts), or a
        list of replies to a list of conversations. Extra keyword arguments go to the chat
        template (e.g. enable_thinking=False for Qwen3)."""
        many = bool(messages) and isinstance(messages[0], (list, tuple))
        convs = messages if many else [messages]
        prompts = [self.apply_chat_template(c, True, tools, **template_kwargs) for c in convs]
        outs = self.generate(prompts, sampling_params)
        return outs if many else outs[0]

    def logits(self, prompt):
        """float32 logits [n_tokens, vocab] at every position of one prompt (text or ids)."""
        return self.engine.all_logits(self._ids(prompt))


def _tokenizer_and_generation_config(path, model):
    """(tokenizer or None, generation_config dict) of a checkpoint folder or GGUF file."""
    if os.path.isfile(path):  # GGUF: the tokenizer lives in the metadata
        metadata = model.checkpoint.file.metadata
        return (GGUFTokenizer(metadata) if "tokenizer.ggml.model" in metadata else None), {}
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
    gen_path = os.path.join(path, "generation_config.json")
    return (CheckpointTokenizer(path) if has_tokenizer else None,
            load_hf_config(gen_path) if os.path.exists(gen_path) else {})


def _per_prompt(params, n, kind):
    """n params of class `kind`: params itself n times (None: kind()), or params, a list of n."""
    if params is None:
        return [kind()] * n
    if isinstance(params, kind):
        return [params] * n
    name = "sampling_params" if kind is SamplingParams else "params"
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"{name} must be one {kind.__name__} or a list of {n} (one per prompt), "
                         f"got {type(params).__name__}")
    if len(params) != n:
        raise ValueError(f"{name} must be one {kind.__name__} or a list of {n} (one per "
                         f"prompt), got a list of {len(params)}")
    for p in params:
        if not isinstance(p, kind):
            raise ValueError(f"{name} must hold {kind.__name__}, got {type(p).__name__}")
    return params
