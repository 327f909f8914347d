"""Jinja2-subset parser: builds the AST (nested tuples) from the lexer's items."""
from .lexer import TemplateError, _normalize, _pos, _tokenize
from .render import _FILTERS, _TESTS, Undefined


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
