"""A small Jinja2-subset evaluator for Hugging Face chat templates (pure standard library).

It reproduces what transformers does (jinja2 ImmutableSandboxedEnvironment with trim_blocks=True,
lstrip_blocks=True, loopcontrols, HF's tojson and raise_exception) for the constructs used by the
Qwen3 family and ChatML/Llama/SmolLM2 style templates. Anything outside the subset raises
TemplateError naming the construct and its line:column; it never renders silently wrong.
"""
from .jinja import Namespace, TemplateError, Undefined  # noqa: F401
from .jinja.lexer import _normalize
from .jinja.parser import _parse
from .jinja.render import _Break, _Continue, _Renderer

__all__ = ["ChatTemplate", "TemplateError"]


class ChatTemplate:
    """A compiled chat template; `render(messages=..., add_generation_prompt=..., tools=..., **extra)`."""

    def __init__(self, source):
        if not isinstance(source, str):
            raise TemplateError("chat template source must be a string")
        self.source = _normalize(source)
        self._body = _parse(source)

    def render(self, messages=None, add_generation_prompt=False, tools=None, **extra):
        ctx = dict(extra)
        ctx["messages"] = messages if messages is not None else []
        ctx["add_generation_prompt"] = add_generation_prompt
        ctx["tools"] = tools
        out = []
        try:
            _Renderer(self.source).run(self._body, [ctx], out)
        except (_Break, _Continue):
            raise TemplateError("'break'/'continue' outside of a for-loop") from None
        return "".join(out)
