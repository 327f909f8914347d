"""Jinja2-subset chat-template evaluator internals (lexer, parser, renderer)."""
from .lexer import TemplateError
from .render import Namespace, Undefined

__all__ = ["TemplateError", "Undefined", "Namespace"]
