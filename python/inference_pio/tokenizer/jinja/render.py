"""Jinja2-subset renderer: evaluation, filters, tests, Undefined, namespace, sandbox rules."""
import json
from datetime import datetime
from numbers import Number

from .lexer import TemplateError, _pos


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

