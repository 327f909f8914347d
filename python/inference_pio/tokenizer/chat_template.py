"""A small Jinja2-subset evaluator for Hugging Face chat templates (pure standard library).

It reproduces what transformers does (jinja2 ImmutableSandboxedEnvironment with trim_blocks=True,
lstrip_blocks=True, loopcontrols, HF's tojson and raise_exception) for the constructs used by the
Qwen3 family and ChatML/Llama/SmolLM2 style templates. Anything outside the subset raises
TemplateError naming the construct and its line:column; it never renders silently wrong.
"""
import json
import re
from datetime import datetime
from numbers import Number

__all__ = ["ChatTemplate", "TemplateError"]


class TemplateError(Exception):
    pass


class Undefined:
    """jinja2's default Undefined: falsy, prints empty, iterates empty; most operations raise."""
    __slots__ = ("_name",)

    def __init__(self, name="value"):
        self._name = name

    def _fail(self, *a, **k):
        raise TemplateError(f"{self._name!r} is undefined")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _fail
    __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = _fail
    __lt__ = __le__ = __gt__ = __ge__ = __call__ = __getitem__ = __neg__ = __pos__ = _fail

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()

    def __eq__(self, other):
        return type(self) is type(other)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return id(type(self))

    def __str__(self):
        return ""

    def __len__(self):
        return 0

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __repr__(self):
        return "Undefined"


class Namespace:
    def __init__(self, **attrs):
        self.__dict__["_attrs"] = dict(attrs)

    def __repr__(self):
        return f"<Namespace {self._attrs!r}>"


class _Break(Exception):
    pass


class _Continue(Exception):
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


# ---------------------------------------------------------------------------------- parser

class _Parser:
    def __init__(self, src, toks, pos):
        self.src, self.toks, self.i, self.tagpos = src, toks, 0, pos

    def where(self, tok=None):
        return _pos(self.src, tok.pos if tok else (self.toks[self.i].pos if self.i < len(self.toks) else self.tagpos))

    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def at(self, kind, value=None, k=0):
        t = self.peek(k)
        return t is not None and t.kind == kind and (value is None or t.value == value)

    def take(self):
        t = self.peek()
        if t is None:
            raise TemplateError(f"unexpected end of tag ({self.where()})")
        self.i += 1
        return t

    def skip(self, kind, value=None):
        if self.at(kind, value):
            self.i += 1
            return True
        return False

    def expect(self, kind, value=None):
        t = self.peek()
        if t is None or t.kind != kind or (value is not None and t.value != value):
            got = "end of tag" if t is None else repr(t.value)
            raise TemplateError(f"expected {value or kind!r}, got {got} ({self.where()})")
        self.i += 1
        return t

    def done(self):
        if self.i < len(self.toks):
            raise TemplateError(f"unexpected {self.toks[self.i].value!r} ({self.where()})")

    # expressions are tuples: (op, ...)
    def expr(self):
        e = self.or_()
        while self.skip("name", "if"):
            cond = self.or_()
            other = self.expr() if self.skip("name", "else") else ("const", Undefined("conditional"))
            e = ("cond", cond, e, other)
        return e

    def or_(self):
        e = self.and_()
        while self.skip("name", "or"):
            e = ("or", e, self.and_())
        return e

    def and_(self):
        e = self.not_()
        while self.skip("name", "and"):
            e = ("and", e, self.not_())
        return e

    def not_(self):
        if self.skip("name", "not"):
            return ("not", self.not_())
        return self.compare()

    def compare(self):
        e = self.math1()
        ops = []
        while True:
            t = self.peek()
            if t is not None and t.kind == "op" and t.value in ("==", "!=", "<", "<=", ">", ">="):
                self.i += 1
                ops.append((t.value, self.math1()))
            elif self.at("name", "in"):
                self.i += 1
                ops.append(("in", self.math1()))
            elif self.at("name", "not") and self.at("name", "in", 1):
                self.i += 2
                ops.append(("notin", self.math1()))
            else:
                break
        return ("compare", e, ops) if ops else e

    def _binary(self, sub, opset):
        e = sub()
        while self.peek() is not None and self.peek().kind == "op" and self.peek().value in opset:
            op = self.take().value
            e = ("bin", op, e, sub())
        return e

    def math1(self):
        return self._binary(self.concat, ("+", "-"))

    def concat(self):
        return self._binary(self.math2, ("~",))

    def math2(self):
        return self._binary(self.pow, ("*", "/", "//", "%"))

    def pow(self):
        return self._binary(self.unary, ("**",))

    def unary(self, with_filter=True):
        if self.skip("op", "-"):
            e = ("neg", self.unary(False))
        elif self.skip("op", "+"):
            e = ("pos", self.unary(False))
        else:
            e = self.postfix(self.primary())
        if with_filter:
            e = self.filters(e)
        return e

    def primary(self):
        t = self.take()
        if t.kind == "name":
            if t.value in ("true", "True"):
                return ("const", True)
            if t.value in ("false", "False"):
                return ("const", False)
            if t.value in ("none", "None"):
                return ("const", None)
            return ("name", t.value, t.pos)
        if t.kind == "str":
            s = t.value
            while self.at("str"):
                s += self.take().value
            return ("const", s)
        if t.kind in ("int", "float"):
            return ("const", t.value)
        if t.kind == "op" and t.value == "(":
            if self.skip("op", ")"):
                return ("tuple", [])
            e = self.expr()
            if self.at("op", ","):
                items = [e]
                while self.skip("op", ","):
                    if self.at("op", ")"):
                        break
                    items.append(self.expr())
                e = ("tuple", items)
            self.expect("op", ")")
            return e
        if t.kind == "op" and t.value == "[":
            items = []
            while not self.skip("op", "]"):
                if items:
                    self.expect("op", ",")
                    if self.skip("op", "]"):
                        break
                items.append(self.expr())
            return ("list", items)
        if t.kind == "op" and t.value == "{":
            pairs = []
            while not self.skip("op", "}"):
                if pairs:
                    self.expect("op", ",")
                    if self.skip("op", "}"):
                        break
                k = self.expr()
                self.expect("op", ":")
                pairs.append((k, self.expr()))
            return ("dict", pairs)
        raise TemplateError(f"unexpected {t.value!r} in expression ({self.where(t)})")

    def args(self):
        args, kwargs = [], []
        while not self.skip("op", ")"):
            if args or kwargs:
                self.expect("op", ",")
            if self.at("name") and self.at("op", "=", 1):
                name = self.take().value
                self.i += 1
                kwargs.append((name, self.expr()))
            else:
                if kwargs:
                    raise TemplateError(f"positional argument after keyword argument ({self.where()})")
                args.append(self.expr())
        return args, kwargs

    def postfix(self, e):
        while True:
            t = self.peek()
            if t is None or t.kind != "op":
                return e
            if t.value == ".":
                self.i += 1
                a = self.take()
                if a.kind == "name":
                    e = ("attr", e, a.value, a.pos)
                elif a.kind == "int":
                    e = ("item", e, ("const", a.value), a.pos)
                else:
                    raise TemplateError(f"expected attribute name after '.' ({self.where(a)})")
            elif t.value == "[":
                self.i += 1
                e = ("item", e, self.subscript(), t.pos)
                self.expect("op", "]")
            elif t.value == "(":
                self.i += 1
                args, kwargs = self.args()
                e = ("call", e, args, kwargs, t.pos)
            else:
                return e

    def subscript(self):
        parts = []
        cur = None
        is_slice = False
        while True:
            if self.at("op", ":"):
                self.i += 1
                parts.append(cur)
                cur = None
                is_slice = True
            elif self.at("op", "]"):
                parts.append(cur)
                break
            else:
                if cur is not None:
                    raise TemplateError(f"bad subscript ({self.where()})")
                cur = self.expr()
        if not is_slice:
            if parts[0] is None:
                raise TemplateError(f"empty subscript ({self.where()})")
            return parts[0]
        if len(parts) > 3:
            raise TemplateError(f"bad slice ({self.where()})")
        parts += [None] * (3 - len(parts))
        return ("slice", *parts)

    def filters(self, e):
        while True:
            if self.at("op", "|"):
                self.i += 1
                t = self.expect("name")
                name = t.value
                while self.at("op", ".") and self.at("name", k=1):
                    self.i += 1
                    name += "." + self.take().value
                args, kwargs = ([], [])
                if self.skip("op", "("):
                    args, kwargs = self.args()
                if name not in _FILTERS:
                    raise TemplateError(f"unsupported filter {name!r} ({self.where(t)})")
                e = ("filter", name, e, args, kwargs, t.pos)
            elif self.at("name", "is"):
                self.i += 1
                neg = self.skip("name", "not")
                t = self.expect("name")
                if t.value not in _TESTS:
                    raise TemplateError(f"unsupported test {t.value!r} ({self.where(t)})")
                args, kwargs = ([], [])
                if self.skip("op", "("):
                    args, kwargs = self.args()
                elif self.peek() is not None and (self.peek().kind in ("str", "int", "float") or (
                        self.peek().kind == "name" and self.peek().value not in (
                            "else", "or", "and", "if", "in", "not", "is"))):
                    args = [self.unary(False)]
                e = ("test", t.value, e, args, kwargs, neg, t.pos)
            else:
                return e

    def target(self):
        """Assignment target: name, name.attr, or a tuple of names."""
        names = [self.expect("name").value]
        if self.skip("op", "."):
            return ("nsattr", names[0], self.expect("name").value)
        while self.skip("op", ","):
            names.append(self.expect("name").value)
        return ("names", names) if len(names) > 1 else ("name", names[0])


_UNSUPPORTED_TAGS = ("macro", "call", "filter", "raw", "include", "import", "from", "extends",
                     "block", "with", "autoescape", "trans", "do", "endmacro", "endcall",
                     "endfilter", "endblock", "endwith", "endautoescape", "endset")


def _parse(src):
    items = _tokenize(_normalize(src))
    pos = [0]

    def parse_body(ends):
        body = []
        while pos[0] < len(items):
            it = items[pos[0]]
            if it[0] == "text":
                body.append(("text", it[1]))
                pos[0] += 1
                continue
            p = _Parser(src, it[1], it[2])
            if it[0] == "var":
                if not it[1]:
                    raise TemplateError(f"empty expression ({_pos(src, it[2])})")
                e = p.expr()
                p.done()
                body.append(("out", e))
                pos[0] += 1
                continue
            if not it[1] or it[1][0].kind != "name":
                raise TemplateError(f"expected a statement name ({_pos(src, it[2])})")
            tag = it[1][0].value
            if tag in ends:
                return body, tag, p
            pos[0] += 1
            p.i = 1
            if tag == "if":
                body.append(parse_if(p))
            elif tag == "for":
                body.append(parse_for(p, it[2]))
            elif tag == "set":
                tgt = p.target()
                if not p.skip("op", "="):
                    raise TemplateError(f"unsupported tag 'set' block form ({_pos(src, it[2])})")
                e = p.expr()
                if p.at("op", ","):
                    items_ = [e]
                    while p.skip("op", ","):
                        items_.append(p.expr())
                    e = ("tuple", items_)
                p.done()
                body.append(("set", tgt, e, it[2]))
            elif tag in ("break", "continue"):
                p.done()
                body.append((tag,))
            elif tag == "generation":
                p.done()
                inner, _, q = parse_body(("endgeneration",))
                q.i = 1
                q.done()
                pos[0] += 1
                body.append(("seq", inner))
            else:
                why = "unsupported tag" if tag in _UNSUPPORTED_TAGS else "unknown or misplaced tag"
                raise TemplateError(f"{why} {tag!r} ({_pos(src, it[2])})")
        if ends:
            raise TemplateError(f"unclosed block: expected one of {', '.join(repr(e) for e in ends)} "
                                f"before end of template")
        return body, None, None

    def parse_if(p):
        branches = []
        cond = p.expr()
        p.done()
        while True:
            body, tag, q = parse_body(("elif", "else", "endif"))
            branches.append((cond, body))
            pos[0] += 1
            q.i = 1
            if tag == "elif":
                cond = q.expr()
                q.done()
            elif tag == "else":
                q.done()
                body, tag, q = parse_body(("endif",))
                pos[0] += 1
                q.i = 1
                q.done()
                return ("if", branches, body)
            else:
                q.done()
                return ("if", branches, [])

    def parse_for(p, where):
        tgt = p.target()
        if tgt[0] == "nsattr":
            raise TemplateError(f"bad for-loop target ({_pos(src, where)})")
        p.expect("name", "in")
        it = p.or_()
        cond = p.expr() if p.skip("name", "if") else None
        if p.at("name", "recursive"):
            raise TemplateError(f"unsupported recursive for-loop ({_pos(src, where)})")
        p.done()
        body, tag, q = parse_body(("else", "endfor"))
        pos[0] += 1
        q.i = 1
        q.done()
        else_body = []
        if tag == "else":
            else_body, tag, q = parse_body(("endfor",))
            pos[0] += 1
            q.i = 1
            q.done()
        return ("for", tgt, it, cond, body, else_body)

    body, tag, p = parse_body(())
    return body


# ------------------------------------------------------------------------------- evaluator

def _s(v):
    return "" if isinstance(v, Undefined) else str(v)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    try:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    except TypeError as exc:
        raise TemplateError(f"tojson: {exc}") from None


def _default(v, default_value="", boolean=False):
    if isinstance(v, Undefined) or (boolean and not v):
        return default_value
    return v


def _first(v):
    for x in v:
        return x
    return Undefined("first")


def _last(v):
    try:
        return list(v)[-1]
    except IndexError:
        return Undefined("last")


def _items(v):
    if isinstance(v, Undefined):
        return iter(())
    if not isinstance(v, dict):
        raise TemplateError("items filter: can only get item pairs from a mapping")
    return iter(v.items())


def _join(v, d="", attribute=None):
    if attribute is not None:
        raise TemplateError("join filter: 'attribute' is not supported")
    return d.join(_s(x) for x in v)


def _replace(v, old, new, count=None):
    return _s(v).replace(old, new, -1 if count is None else count)


_FILTERS = {
    "length": len, "count": len,
    "trim": lambda v, chars=None: _s(v).strip(chars),
    "tojson": _tojson,
    "string": _s,
    "lower": lambda v: _s(v).lower(),
    "upper": lambda v: _s(v).upper(),
    "capitalize": lambda v: _s(v).capitalize(),
    "title": lambda v: _s(v).title(),
    "default": _default, "d": _default,
    "join": _join,
    "first": _first, "last": _last,
    "list": lambda v: list(v),
    "items": _items,
    "replace": _replace,
    "int": lambda v, default=0: _to_int(v, default),
    "float": lambda v, default=0.0: _to_float(v, default),
    "abs": abs,
    "reverse": lambda v: v[::-1] if isinstance(v, str) else list(reversed(list(v))),
    "safe": lambda v: v,
}


def _to_int(v, default):
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return default


def _to_float(v, default):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _is_sequence(v):
    try:
        len(v)
        v.__getitem__
    except Exception:
        return False
    return True


def _is_iterable(v):
    try:
        iter(v)
    except TypeError:
        return False
    return True


_TESTS = {
    "defined": lambda v: not isinstance(v, Undefined),
    "undefined": lambda v: isinstance(v, Undefined),
    "none": lambda v: v is None,
    "string": lambda v: isinstance(v, str),
    "mapping": lambda v: isinstance(v, dict),
    "sequence": _is_sequence,
    "iterable": _is_iterable,
    "number": lambda v: isinstance(v, Number),
    "integer": lambda v: isinstance(v, int) and v is not True and v is not False,
    "float": lambda v: isinstance(v, float),
    "boolean": lambda v: v is True or v is False,
    "true": lambda v: v is True,
    "false": lambda v: v is False,
    "even": lambda v: v % 2 == 0,
    "odd": lambda v: v % 2 == 1,
    "divisibleby": lambda v, n: v % n == 0,
    "eq": lambda v, o: v == o, "equalto": lambda v, o: v == o, "==": lambda v, o: v == o,
    "ne": lambda v, o: v != o, "!=": lambda v, o: v != o,
    "lt": lambda v, o: v < o, "gt": lambda v, o: v > o,
    "le": lambda v, o: v <= o, "ge": lambda v, o: v >= o,
    "in": lambda v, o: v in o,
    "lower": lambda v: str(v).islower(),
    "upper": lambda v: str(v).isupper(),
    "callable": callable,
}

_STR_METHODS = {"startswith", "endswith", "split", "rsplit", "strip", "lstrip", "rstrip", "lower",
                "upper", "replace", "title", "capitalize", "find", "rfind", "count", "splitlines",
                "isdigit", "isalpha", "isspace"}
_DICT_METHODS = {"items", "keys", "values", "get"}


class _Loop:
    def __init__(self, items, i):
        self._items, self.index0 = items, i
        self.length = len(items)
        self.index = i + 1
        self.first = i == 0
        self.last = i == self.length - 1
        self.revindex = self.length - i
        self.revindex0 = self.length - i - 1
        self.previtem = items[i - 1] if i > 0 else Undefined("loop.previtem")
        self.nextitem = items[i + 1] if i + 1 < self.length else Undefined("loop.nextitem")

    def cycle(self, *args):
        return args[self.index0 % len(args)]


def _getattr(obj, name, where):
    if isinstance(obj, Undefined):
        obj._fail()
    if name.startswith("_"):
        raise TemplateError(f"access to attribute {name!r} is not allowed ({where})")
    if isinstance(obj, Namespace):
        return obj._attrs.get(name, Undefined(name))
    if isinstance(obj, _Loop):
        if name in ("index0", "index", "first", "last", "length", "revindex", "revindex0",
                    "previtem", "nextitem", "cycle"):
            return getattr(obj, name)
        raise TemplateError(f"unsupported loop attribute {name!r} ({where})")
    if isinstance(obj, str):
        if name in _STR_METHODS:
            return getattr(obj, name)
        if hasattr(obj, name):
            raise TemplateError(f"unsupported string method {name!r} ({where})")
        return Undefined(name)
    if isinstance(obj, dict):
        if name in _DICT_METHODS:
            method = getattr(obj, name)
            if name == "get":
                return lambda key, default=None: obj.get(key, default)
            return method
        if hasattr(obj, name):
            raise TemplateError(f"unsupported mapping method {name!r} ({where})")
        return obj.get(name, Undefined(name)) if name in obj else Undefined(name)
    if isinstance(obj, (list, tuple)):
        if hasattr(obj, name):
            raise TemplateError(f"unsupported sequence method {name!r} ({where})")
        return Undefined(name)
    if obj is None or isinstance(obj, (int, float, bool)):
        return Undefined(name)
    raise TemplateError(f"attribute access on {type(obj).__name__} is not supported ({where})")


def _getitem(obj, key, where):
    if isinstance(obj, Undefined):
        obj._fail()
    if isinstance(key, slice):
        try:
            return obj[key]
        except (TypeError, LookupError):
            return Undefined("slice")
    if isinstance(obj, (dict, list, tuple, str)):
        try:
            return obj[key]
        except (TypeError, LookupError):
            if isinstance(key, str):
                return _getattr(obj, key, where)
            return Undefined(repr(key))
    if isinstance(obj, (Namespace, _Loop)) and isinstance(key, str):
        return _getattr(obj, key, where)
    if obj is None or isinstance(obj, (int, float, bool)):
        return Undefined(repr(key))
    raise TemplateError(f"item access on {type(obj).__name__} is not supported ({where})")


def _raise_exception(message):
    raise TemplateError(message)


def _namespace(*args, **kwargs):
    return Namespace(**dict(*args, **kwargs))


def _range(*args):
    r = range(*args)
    if len(r) > 100000:
        raise TemplateError("range too big")
    return r


_GLOBALS = {
    "namespace": _namespace,
    "raise_exception": _raise_exception,
    "range": _range,
    "dict": lambda *a, **k: dict(*a, **k),
    "strftime_now": lambda fmt: datetime.now().strftime(fmt),
}
_CALLABLE_TYPES = (type(len), type("".strip), type(lambda: 0), type(Namespace().__repr__))


class _Renderer:
    def __init__(self, src):
        self.src = src

    def where(self, p):
        return _pos(self.src, p)

    def lookup(self, scopes, name):
        for sc in reversed(scopes):
            if name in sc:
                return sc[name]
        if name in _GLOBALS:
            return _GLOBALS[name]
        return Undefined(name)

    def ev(self, e, sc):
        op = e[0]
        try:
            if op == "const":
                return e[1]
            if op == "name":
                return self.lookup(sc, e[1])
            if op == "attr":
                return _getattr(self.ev(e[1], sc), e[2], self.where(e[3]))
            if op == "item":
                k = e[2]
                key = slice(*(None if x is None else self.ev(x, sc) for x in k[1:])) \
                    if k[0] == "slice" else self.ev(k, sc)
                return _getitem(self.ev(e[1], sc), key, self.where(e[3]))
            if op == "or":
                return self.ev(e[1], sc) or self.ev(e[2], sc)
            if op == "and":
                return self.ev(e[1], sc) and self.ev(e[2], sc)
            if op == "not":
                return not self.ev(e[1], sc)
            if op == "cond":
                return self.ev(e[2], sc) if self.ev(e[1], sc) else self.ev(e[3], sc)
            if op == "bin":
                a, b = self.ev(e[2], sc), self.ev(e[3], sc)
                o = e[1]
                if o == "~":
                    return _s(a) + _s(b)
                if o == "+":
                    return a + b
                if o == "-":
                    return a - b
                if o == "*":
                    return a * b
                if o == "/":
                    return a / b
                if o == "//":
                    return a // b
                if o == "%":
                    return a % b
                if o == "**":
                    return a ** b
            if op == "neg":
                return -self.ev(e[1], sc)
            if op == "pos":
                return +self.ev(e[1], sc)
            if op == "compare":
                a = self.ev(e[1], sc)
                for o, rhs in e[2]:
                    b = self.ev(rhs, sc)
                    if o == "==":
                        r = a == b
                    elif o == "!=":
                        r = a != b
                    elif o == "<":
                        r = a < b
                    elif o == "<=":
                        r = a <= b
                    elif o == ">":
                        r = a > b
                    elif o == ">=":
                        r = a >= b
                    elif o == "in":
                        r = a in b
                    else:
                        r = a not in b
                    if not r:
                        return False
                    a = b
                return True
            if op == "list":
                return [self.ev(x, sc) for x in e[1]]
            if op == "tuple":
                return tuple(self.ev(x, sc) for x in e[1])
            if op == "dict":
                return {self.ev(k, sc): self.ev(v, sc) for k, v in e[1]}
            if op == "filter":
                args = [self.ev(x, sc) for x in e[3]]
                kwargs = {k: self.ev(v, sc) for k, v in e[4]}
                return _FILTERS[e[1]](self.ev(e[2], sc), *args, **kwargs)
            if op == "test":
                args = [self.ev(x, sc) for x in e[3]]
                kwargs = {k: self.ev(v, sc) for k, v in e[4]}
                r = bool(_TESTS[e[1]](self.ev(e[2], sc), *args, **kwargs))
                return not r if e[5] else r
            if op == "call":
                f = self.ev(e[1], sc)
                if isinstance(f, Undefined):
                    f._fail()
                if not isinstance(f, _CALLABLE_TYPES):
                    raise TemplateError(f"object of type {type(f).__name__} is not callable "
                                        f"({self.where(e[4])})")
                args = [self.ev(x, sc) for x in e[2]]
                kwargs = {k: self.ev(v, sc) for k, v in e[3]}
                return f(*args, **kwargs)
        except TemplateError:
            raise
        except (TypeError, ValueError, ZeroDivisionError, AttributeError, KeyError, IndexError) as exc:
            raise TemplateError(f"error evaluating {op!r} expression: {exc}") from None
        raise TemplateError(f"internal: unknown expression node {op!r}")

    def assign(self, tgt, value, sc, where):
        if tgt[0] == "name":
            sc[-1][tgt[1]] = value
        elif tgt[0] == "names":
            vals = list(value)
            if len(vals) != len(tgt[1]):
                raise TemplateError(f"cannot unpack {len(vals)} values into {len(tgt[1])} names "
                                    f"({self.where(where)})")
            for n, v in zip(tgt[1], vals):
                sc[-1][n] = v
        else:
            ns = self.lookup(sc, tgt[1])
            if not isinstance(ns, Namespace):
                raise TemplateError(f"cannot assign attribute on non-namespace object {tgt[1]!r} "
                                    f"({self.where(where)})")
            ns._attrs[tgt[2]] = value

    def run(self, body, sc, out):
        for node in body:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "out":
                out.append(_s(self.ev(node[1], sc)))
            elif kind == "if":
                for cond, b in node[1]:
                    if self.ev(cond, sc):
                        self.run(b, sc, out)
                        break
                else:
                    self.run(node[2], sc, out)
            elif kind == "for":
                self.run_for(node, sc, out)
            elif kind == "set":
                self.assign(node[1], self.ev(node[2], sc), sc, node[3])
            elif kind == "seq":
                self.run(node[1], sc, out)
            elif kind == "break":
                raise _Break()
            elif kind == "continue":
                raise _Continue()

    def run_for(self, node, sc, out):
        _, tgt, it_e, cond, body, else_body = node
        seq = self.ev(it_e, sc)
        if isinstance(seq, dict):
            seq = list(seq)
        try:
            items = list(seq)
        except TypeError:
            raise TemplateError(f"for-loop over non-iterable {type(seq).__name__}") from None
        if cond is not None:
            kept = []
            for x in items:
                scope = {}
                self.assign(tgt, x, sc + [scope], 0)
                if self.ev(cond, sc + [scope]):
                    kept.append(x)
            items = kept
        if not items:
            self.run(else_body, sc, out)
            return
        for i, x in enumerate(items):
            scope = {"loop": _Loop(items, i)}
            inner = sc + [scope]
            self.assign(tgt, x, inner, 0)
            try:
                self.run(body, inner, out)
            except _Continue:
                continue
            except _Break:
                break


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
