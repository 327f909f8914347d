"""LLM: the front door. Loads a checkpoint folder (model, tokenizer, chat template, generation
config), starts an engine over it, and offers generate / stream / chat / logits."""
import os
from dataclasses import dataclass

from .. import dtypes
from ..io.hf_config import eos_token_ids, load_hf_config
from ..tokenizer import CheckpointTokenizer, GGUFTokenizer
from .llm_engine import LLMEngine
from .loader import load_model, resolve_dtype
from .params import RequestOutput, SamplingParams
from .sequence import Status


@dataclass
class StreamDelta:
    """One step of a streamed request: the token produced and the text it completed (possibly ""
    while a multi-byte character is still partial). The last delta has finish_reason set."""
    token_id: int
    text: str
    finish_reason: str | None = None


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
    scheduler's limits per step (a longer prompt is prefilled in chunks of the latter).
    enforce_eager: run every step op by op instead of replaying captured decode graphs.
    overlap: launch each decode step before the previous one's tokens are read back, so that the
    GPU never waits for the host between steps (engine/llm_engine.py); "auto" is on for a GPU
    unless enforce_eager, True runs the same code path on the CPU too.
    kv_cache_dtype: "float32", "bfloat16", "float16", or "auto": float16 when the weight matrices
    are block-quantized and the other weights float32 (quantized GGUF files, or `quantization`
    on a float32 checkpoint), as llama.cpp's cache; otherwise the float weights' dtype."""

    def __init__(self, model, device="cpu", dtype="auto", quantization=None, max_model_len=None,
                 kv_cache_tokens=None, block_size=16, max_num_seqs=32, max_num_batched_tokens=512,
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
        self.engine = LLMEngine(self.model, eos, max_model_len, kv_cache_tokens, block_size,
                                max_num_seqs, max_num_batched_tokens, use_graphs=not enforce_eager,
                                kv_dtype=_kv_dtype(self.model, kv_cache_dtype), overlap=overlap)

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
        together through the engine. sampling_params: one for all, or a list with one per
        prompt. Returns a list of RequestOutput in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts))
        seqs = [self.engine.add_request(self._ids(p), sp) for p, sp in zip(prompts, params)]
        try:
            while self.engine.has_unfinished():
                self.engine.step()
        finally:
            for seq in seqs:  # an interrupted call leaves no request behind in the engine
                if seq.status is not Status.FINISHED:
                    self.engine.abort(seq)
            self.engine.drain()  # nor a step in flight
        return [self._output(s) for s in seqs]

    def _output(self, seq):
        ids = seq.completion_ids
        return RequestOutput(seq.request_id, seq.token_ids[:seq.num_prompt_tokens], ids,
                             self._text(ids, seq.params), seq.finish_reason,
                             logprobs=seq.logprobs, cumulative_logprob=seq.cumulative_logprob)

    def stream(self, prompt, sampling_params=None):
        """Yields a StreamDelta per generated token of one prompt, as it is produced. Text never
        ends in a broken UTF-8 character: bytes of a partial one are held for the next delta."""
        params = sampling_params or SamplingParams()
        seq = self.engine.add_request(self._ids(prompt), params)
        decoder = self._need_tokenizer().incremental_decoder(params.skip_special_tokens) if self.tokenizer else None
        try:
            while seq.status is not Status.FINISHED:
                for s, tid in self.engine.step():
                    if s is seq:
                        text = decoder.add(tid) if decoder else ""
                        done = seq.status is Status.FINISHED
                        if done and decoder:
                            text += decoder.finish()
                        yield StreamDelta(tid, text, seq.finish_reason if done else None)
        finally:
            if seq.status is not Status.FINISHED:
                self.engine.abort(seq)
            self.engine.drain()  # the step launched behind the last one (its token is dropped)

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


def _per_prompt(sampling_params, n):
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling_params must be one SamplingParams or a list of {n}")
    return params
