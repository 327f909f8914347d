"""Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (Qwen2/Qwen3, GPT-2 style), or
assembled from parts (tokenizer.gguf builds one from GGUF metadata).

Pipeline, as `tokenizers` runs it: added tokens are cut out of the raw text first (so a chat marker
is one id, never re-split), each remaining segment is normalised, split by the pre-tokenizer, mapped
byte -> printable char, and BPE-merged by merge rank. Only the pieces these models use are
implemented; anything else in the file is refused with an error naming it, so a tokenizer that would
silently disagree with the reference never loads.
"""
import codecs
import heapq
import json
import re
import unicodedata

from .pretokenize import SPLIT_PATTERNS, WHITESPACE, bytes_to_unicode, split_gpt2

_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_BYTE_DECODER = {ch: b for b, ch in bytes_to_unicode().items()}
_BYTE_ENCODER = [bytes_to_unicode()[b] for b in range(256)]


class TokenizerError(ValueError):
    """A tokenizer.json this module cannot reproduce faithfully, or one that is malformed."""


def _token_bytes(token):
    # ByteLevel decoder: a token made only of byte-alphabet chars is those bytes; any other token
    # (an added token such as "a\tb") contributes its UTF-8 as is.
    try:
        return bytes(_BYTE_DECODER[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


class Tokenizer:
    """Byte-level BPE assembled from parsed parts; from_file/from_dict read a tokenizer.json, and
    tokenizer.gguf builds one from GGUF metadata.

    vocab: {token: id}, tokens spelled in the byte alphabet. merges: "a b" strings or pairs, best
    first. splits: the pre-tokenizer as (text -> pieces) functions applied in turn, before the
    byte mapping. normalizers: unicodedata forms. added_tokens: entries shaped like
    tokenizer.json's added_tokens. template: the single-sequence post-processor template (ids, None
    standing for the text) or None. unk_token, ignore_merges: as in tokenizer.json's BPE model.
    """

    def __init__(self, vocab, merges, *, splits, normalizers=(), added_tokens=(), template=None,
                 unk_token=None, ignore_merges=False):
        self.vocab = dict(vocab)
        self._ranks = self._merge_ranks(merges)
        self._splits = list(splits)
        self._normalizers = list(normalizers)
        self._template = template
        self._unk = self.vocab.get(unk_token) if unk_token is not None else None
        self._ignore_merges = bool(ignore_merges)
        self._init_added(added_tokens)
        self._cache = {}

    @classmethod
    def from_file(cls, path):
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise TokenizerError(f"malformed tokenizer.json {path}: {e}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj):
        if not isinstance(obj, dict):
            raise TokenizerError("tokenizer.json must be a JSON object")
        try:
            return cls(**cls._parse(obj))
        except (KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong kind
            raise TokenizerError(f"malformed tokenizer.json: {type(e).__name__}: {e}") from None

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def _parse(cls, obj):
        """tokenizer.json -> the constructor's arguments."""
        m = obj.get("model") or {}
        cls._check_model(m)
        dec = obj.get("decoder")
        if not dec or dec.get("type") != "ByteLevel":
            raise TokenizerError(f"unsupported decoder {dec and dec.get('type')!r}: need ByteLevel")
        return {"vocab": m.get("vocab") or {}, "merges": m.get("merges") or [],
                "splits": cls._parse_pre_tokenizer(obj.get("pre_tokenizer")),
                "normalizers": cls._parse_normalizer(obj.get("normalizer")),
                "added_tokens": obj.get("added_tokens") or [],
                "template": cls._parse_post_processor(obj.get("post_processor")),
                "unk_token": m.get("unk_token"), "ignore_merges": m.get("ignore_merges")}

    @staticmethod
    def _check_model(m):
        if m.get("type") != "BPE":
            raise TokenizerError(f"unsupported model type {m.get('type')!r}: only BPE")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if m.get(key):
                raise TokenizerError(f"unsupported BPE option {key}={m[key]!r}")
        if m.get("byte_fallback"):
            raise TokenizerError("unsupported BPE option byte_fallback=true")

    def _merge_ranks(self, merges):
        # Like the reference, a merge must name two vocabulary tokens whose concatenation is one
        # too: anything else is a corrupt file, and would otherwise only fail deep in encode.
        ranks, vocab = {}, self.vocab
        for rank, merge in enumerate(merges):
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab \
                    or pair[0] + pair[1] not in vocab:
                raise TokenizerError(f"bad merge #{rank}: {merge!r} (needs two vocabulary tokens "
                                     f"whose concatenation is one too)")
            ranks.setdefault(pair, rank)
        return ranks

    @staticmethod
    def _parse_normalizer(n):
        if n is None:
            return []
        if n.get("type") == "Sequence":
            return [f for sub in n.get("normalizers", []) for f in Tokenizer._parse_normalizer(sub)]
        if n.get("type") not in _NORMALIZERS:
            raise TokenizerError(f"unsupported normalizer {n.get('type')!r}")
        return [n["type"]]

    @staticmethod
    def _parse_pre_tokenizer(p):
        """-> list of (piece -> pieces) functions, applied in turn. ByteLevel must come last: the
        vocabulary is in its byte alphabet, and splits are defined on the text before mapping."""
        steps = [p] if p else []
        if p and p.get("type") == "Sequence":
            steps = p.get("pretokenizers", [])
        if not steps or steps[-1].get("type") != "ByteLevel":
            raise TokenizerError("unsupported pre_tokenizer: byte-level BPE needs ByteLevel last")
        splits = []
        for s in steps[:-1]:
            if s.get("type") != "Split":
                raise TokenizerError(f"unsupported pre_tokenizer {s.get('type')!r}")
            pattern = s.get("pattern", {})
            regex = pattern.get("Regex")
            if regex not in SPLIT_PATTERNS:
                raise TokenizerError(f"unsupported Split pattern {regex or pattern!r}")
            if s.get("behavior") != "Isolated" or s.get("invert"):
                raise TokenizerError(f"unsupported Split behavior {s.get('behavior')!r} "
                                     f"(invert={s.get('invert')!r}): only Isolated")
            splits.append(SPLIT_PATTERNS[regex])
        byte_level = steps[-1]
        if byte_level.get("add_prefix_space"):  # ByteLevel prepends to each piece it receives...
            splits.append(lambda piece: [piece if piece.startswith(" ") else " " + piece])
        if byte_level.get("use_regex", True):  # ...and then splits it with the GPT-2 regex
            splits.append(split_gpt2)
        return splits

    @staticmethod
    def _parse_post_processor(p):
        """-> the single-sequence template as a list of ids/None (None = the text), or None."""
        if p is None or p.get("type") == "ByteLevel":
            return None
        if p.get("type") == "Sequence":
            found = [Tokenizer._parse_post_processor(s) for s in p.get("processors", [])]
            found = [t for t in found if t is not None]
            if len(found) > 1:
                raise TokenizerError("unsupported post_processor: several TemplateProcessing")
            return found[0] if found else None
        if p.get("type") != "TemplateProcessing":
            raise TokenizerError(f"unsupported post_processor {p.get('type')!r}")
        template = []
        for item in p.get("single", []):
            if "Sequence" in item:
                template.append(None)
            else:
                template.extend(p["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return template

    def _init_added(self, added):
        self.added_tokens = {}  # content -> id
        self._special_ids = set()
        self._strip = {}  # content -> (lstrip, rstrip)
        raw, normalized = [], []
        for t in added:
            if t.get("single_word"):
                raise TokenizerError(f"unsupported added token flag single_word: {t['content']!r}")
            self.added_tokens[t["content"]] = t["id"]
            if t.get("special"):
                self._special_ids.add(t["id"])
            self._strip[t["content"]] = (bool(t.get("lstrip")), bool(t.get("rstrip")))
            (normalized if t.get("normalized", not t.get("special")) else raw).append(t["content"])
        self._added_raw, self._added_norm = self._alternation(raw), self._alternation(normalized)
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._id_to_token.update({i: t for t, i in self.added_tokens.items()})
        self._bytes = {}

    @staticmethod
    def _alternation(tokens):
        # Longest first, so at the leftmost position the longest token wins (leftmost-longest,
        # like the oracle's Aho-Corasick matcher).
        if not tokens:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    # ---- encoding ------------------------------------------------------------------------------
    def _split_added(self, text, pattern):
        """Yield (segment, None) for plain text and (content, id) for each added token."""
        pos = 0
        while pattern is not None and (m := pattern.search(text, pos)):
            start, end = m.span()
            lstrip, rstrip = self._strip[m.group()]
            while lstrip and start > pos and text[start - 1] in WHITESPACE:
                start -= 1
            while rstrip and end < len(text) and text[end] in WHITESPACE:
                end += 1
            if start > pos:
                yield text[pos:start], None
            yield m.group(), self.added_tokens[m.group()]
            pos = end
        if pos < len(text):
            yield text[pos:], None

    def _pieces(self, text):
        pieces = [text]
        for split in self._splits:
            pieces = [q for p in pieces for q in split(p)]
        return pieces

    def _merge(self, syms):
        """Repeatedly merge the lowest-ranked adjacent pair, leftmost first on ties (as the
        reference's priority queue does). A heap over a linked list keeps long words (base64,
        whitespace runs) O(n log n) instead of rescanning every pair after each merge."""
        ranks, n = self._ranks, len(syms)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(r, i) for i in range(n - 1)
                if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] is None or j >= n or ranks.get((syms[i], syms[j])) != r:
                continue  # stale: one side was merged away since this entry was pushed
            syms[i], syms[j] = syms[i] + syms[j], None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                if (r := ranks.get((syms[i], syms[nxt[i]]))) is not None:
                    heapq.heappush(heap, (r, i))
            if prv[i] >= 0 and (r := ranks.get((syms[prv[i]], syms[i]))) is not None:
                heapq.heappush(heap, (r, prv[i]))
        return [s for s in syms if s is not None]

    def _bpe(self, word):
        """Ids for one pre-token (byte-alphabet string). Cached: real text repeats words a lot."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if self._ignore_merges and word in self.vocab:
            syms = [word]
        else:
            syms = self._merge(list(word))
        ids = []
        for s in syms:  # a symbol outside the vocabulary becomes unk, or is dropped without one
            i = self.vocab.get(s, self._unk)
            if i is not None:
                ids.append(i)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text, add_special_tokens=True):
        """Token ids of `text`. add_special_tokens applies the post-processor's template (Qwen's
        adds nothing: no BOS)."""
        ids = []
        for segment, tid in self._split_added(text, self._added_raw):
            if tid is not None:
                ids.append(tid)
                continue
            for form in self._normalizers:
                segment = unicodedata.normalize(form, segment)
            for part, tid in self._split_added(segment, self._added_norm):
                if tid is not None:
                    ids.append(tid)
                    continue
                for piece in self._pieces(part):
                    word = "".join(_BYTE_ENCODER[b] for b in piece.encode("utf-8"))
                    ids.extend(self._bpe(word))
        if add_special_tokens and self._template is not None:
            ids = [x for t in self._template for x in (ids if t is None else [t])]
        return ids

    # ---- decoding ------------------------------------------------------------------------------
    def token_bytes(self, tid, skip_special_tokens=False):
        """The bytes one id contributes to decoded text (b"" for unknown or skipped ids)."""
        if skip_special_tokens and tid in self._special_ids:
            return b""
        b = self._bytes.get(tid)
        if b is None:
            tok = self._id_to_token.get(tid)
            b = self._bytes[tid] = b"" if tok is None else _token_bytes(tok)
        return b

    def decode(self, ids, skip_special_tokens=False):
        """Text of `ids`; invalid UTF-8 becomes U+FFFD, as the reference's from_utf8_lossy does."""
        data = b"".join(self.token_bytes(i, skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_to_id(self, token):
        return self.added_tokens.get(token, self.vocab.get(token))

    def id_to_token(self, tid):
        return self._id_to_token.get(tid)

    @property
    def vocab_size(self):
        """Distinct tokens, added ones included (Qwen3: 151,669; the embedding has padding rows)."""
        return len(self._id_to_token)

    def incremental_decoder(self, skip_special_tokens=False):
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streams text while ids arrive: bytes of a partial UTF-8 character are held back until it
    completes (or proves invalid), so every delta is whole text and the deltas, followed by
    finish(), concatenate to exactly Tokenizer.decode of all the ids."""

    def __init__(self, tokenizer, skip_special_tokens=False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, tid):
        """Feed one id; returns the newly completed text (possibly "")."""
        return self._utf8.decode(self._tok.token_bytes(tid, self._skip))

    def finish(self):
        """Flush at end of stream: an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
