"""Jinja2-subset lexer: tokens, whitespace control, trim_blocks and lstrip_blocks."""
import re


class TemplateError(Exception):
    pass


# ----------------------------------------------------------------------------------- lexer

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<float>\d+\.\d+(?:[eE][+-]?\d+)?)
  | (?P<int>\d+)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>//|\*\*|==|!=|<=|>=|[-+*/%~<>()\[\]{},.:|=])
""", re.X | re.S)


def _pos(src, i):
    line = src.count("\n", 0, i) + 1
    col = i - (src.rfind("\n", 0, i) + 1) + 1
    return f"line {line}, column {col}"


class _Tok:
    __slots__ = ("kind", "value", "pos")

    def __init__(self, kind, value, pos):
        self.kind, self.value, self.pos = kind, value, pos

    def __repr__(self):
        return f"{self.kind}:{self.value!r}"


def _lex_tag(src, i, end):
    """Tokenizes an expression starting at i up to the closing delimiter `end` ('}}' or '%}').

    Returns (tokens, strip_after, index just past the delimiter)."""
    toks = []
    n = len(src)
    while True:
        if i >= n:
            raise TemplateError(f"unclosed tag: missing {end!r} ({_pos(src, n)})")
        if src.startswith("-" + end, i):
            return toks, True, i + 1 + len(end)
        if src.startswith(end, i):
            return toks, False, i + len(end)
        m = _TOKEN_RE.match(src, i)
        if not m:
            raise TemplateError(f"unexpected character {src[i]!r} ({_pos(src, i)})")
        kind = m.lastgroup
        if kind != "ws":
            text = m.group()
            if kind == "str":
                value = text[1:-1].encode("ascii", "backslashreplace").decode("unicode-escape")
            elif kind == "int":
                value = int(text)
            elif kind == "float":
                value = float(text)
            else:
                value = text
            toks.append(_Tok(kind, value, i))
        i = m.end()


def _normalize(src):
    """jinja2 defaults: newlines become '\\n' and a single trailing newline is dropped."""
    src = re.sub(r"\r\n|\r", "\n", src)
    return src[:-1] if src.endswith("\n") else src


def _tokenize(src):
    """Splits the source into ('text', str) / ('var', toks, pos) / ('block', toks, pos) items,
    applying -/+ whitespace control, trim_blocks and lstrip_blocks exactly as jinja2 does."""
    items = []
    i = 0
    n = len(src)
    line_starting = True
    strip_next = False
    tag_re = re.compile(r"\{\{|\{%|\{#")
    while i < n:
        m = tag_re.search(src, i)
        text = src[i:m.start() if m else n]
        if strip_next:
            text = text.lstrip()
            strip_next = False
        if not m:
            if text:
                items.append(("text", text))
            break
        start = m.start()
        kind = m.group()
        j = m.end()
        sign = src[j] if j < n and src[j] in "-+" else ""
        if sign:
            j += 1
        if sign == "-":
            text = text.rstrip()
        elif sign != "+" and kind != "{{":
            l_pos = text.rfind("\n") + 1
            if (l_pos > 0 or line_starting) and re.fullmatch(r"\s+", text[l_pos:] or "x"):
                text = text[:l_pos]
        if text:
            items.append(("text", text))
        if kind == "{#":
            k = src.find("#}", j)
            if k < 0:
                raise TemplateError(f"unclosed comment ({_pos(src, start)})")
            end = k + 2
            if src[k - 1] == "-" and k - 1 >= j:
                strip_next = True
            elif src.startswith("\n", end):
                end += 1
            matched_end = src[end - 1]
            i = end
        else:
            close = "}}" if kind == "{{" else "%}"
            toks, strip, end = _lex_tag(src, j, close)
            if strip:
                strip_next = True
            elif kind == "{%" and src.startswith("\n", end):
                end += 1
            items.append(("var" if kind == "{{" else "block", toks, start))
            matched_end = src[end - 1]
            i = end
        if strip_next:
            k = i
            while k < n and src[k].isspace():
                k += 1
            matched_end = src[k - 1] if k > 0 else ""
            i = k
            strip_next = False
        line_starting = matched_end == "\n"
    return items
