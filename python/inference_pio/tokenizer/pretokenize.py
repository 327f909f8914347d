"""Pre-tokenisation for byte-level BPE: the Qwen2, Llama-3 and GPT-2 split regexes (the latter also
after individual digits, SmolLM2's) as hand-written scanners.

The `regex` module is not a run-time dependency and `re` has no \\p{L}/\\p{N} classes, so each
supported pattern is a small scanner that reproduces what the Oniguruma engine (used by Hugging Face
`tokenizers`) matches: the leftmost alternative wins, quantifiers are greedy and backtrack. Only the
patterns listed in SPLIT_PATTERNS are understood; anything else is refused by name rather than
approximated.
"""
import bisect
import unicodedata

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's pattern with numbers in runs of up to three digits (Llama-3, llama.cpp's "llama-bpe").
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# What \s matches in tokenizers' Oniguruma: Unicode White_Space. Not str.isspace(): that also takes
# the information separators \x1c-\x1f, which the oracle treats as ordinary symbols.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                       "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")

# Oniguruma's Unicode tables are newer than some Pythons' unicodedata (3.11 has Unicode 14): these
# code points are letters / numbers there but unassigned (Cn) here. Consulted only for Cn, so a
# newer Python that already knows them gives the same answer.
_NEW_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389),
    (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7),
    (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11BC0, 0x11BE0), (0x11F02, 0x11F02),
    (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F), (0x13441, 0x13446),
    (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D),
    (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739),
    (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_NEW_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59),
    (0x16130, 0x16139), (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3),
    (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)

LETTER, NUMBER, SPACE, OTHER = "L", "N", "S", "O"
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
_class_cache = {}


def _in_ranges(cp, ranges):
    k = bisect.bisect_right(ranges, (cp, 0x10FFFF)) - 1  # last range starting at or before cp
    return k >= 0 and cp <= ranges[k][1]


def char_class(c):
    """L (\\p{L}), N (\\p{N}), S (\\s) or O (everything else: [^\\s\\p{L}\\p{N}])."""
    k = _class_cache.get(c)
    if k is None:
        cat = unicodedata.category(c)
        if c in WHITESPACE:
            k = SPACE
        elif cat[0] == "L" or (cat == "Cn" and _in_ranges(ord(c), _NEW_LETTERS)):
            k = LETTER
        elif cat[0] == "N" or (cat == "Cn" and _in_ranges(ord(c), _NEW_NUMBERS)):
            k = NUMBER
        else:
            k = OTHER
        if len(_class_cache) < 100_000:  # bounded: random text can touch all 1.1M code points
            _class_cache[c] = k
    return k


def _fold(c):
    # Simple case folding onto the ASCII letters used by the contractions: U+017F LONG S folds to
    # 's' (the oracle splits "'ſ"); Kelvin/Angstrom signs fold to letters the pattern never uses.
    return "s" if c == "\u017f" else c.lower() if c.isascii() else c


def _contraction(text, i, ignore_case):
    """End of a contraction ('s, 't, ...) starting at text[i] == "'", or 0."""
    for suf in _CONTRACTIONS:
        got = text[i + 1:i + 1 + len(suf)]
        if ignore_case:
            got = "".join(_fold(c) for c in got)
        if got == suf:
            return i + 1 + len(suf)
    return 0


def _run(kinds, i, kind, limit=None):
    """End of the run of `kind` starting at i (at most `limit` long)."""
    n = len(kinds) if limit is None else min(len(kinds), i + limit)
    while i < n and kinds[i] == kind:
        i += 1
    return i


def _whitespace_end(text, kinds, i, newline_rule, digits_apart=False):
    """End of the match for a whitespace run at i: `\\s*[\\r\\n]+` (Qwen only), then
    `\\s+(?!\\S)` (all but the last space when a word follows), then `\\s+`. digits_apart: a
    number after the run is in another piece, so the run ends as at the end of the text."""
    j = _run(kinds, i, SPACE)
    if newline_rule:
        last_nl = max(text.rfind("\r", i, j), text.rfind("\n", i, j))
        if last_nl >= 0:
            return last_nl + 1
    if j < len(text) and j - 1 > i and not (digits_apart and kinds[j] == NUMBER):
        return j - 1
    return j


def _split_qwen_like(text, max_digits):
    """Pieces of `text` under QWEN2_PATTERN (max_digits=1) or LLAMA3_PATTERN (max_digits=3); every
    character lands in exactly one piece."""
    kinds = [char_class(c) for c in text]
    n, i, out = len(text), 0, []
    while i < n:
        c, k = text[i], kinds[i]
        nxt = kinds[i + 1] if i + 1 < n else None
        if c == "'" and (j := _contraction(text, i, True)):
            pass
        elif k == LETTER:
            j = _run(kinds, i, LETTER)
        elif k != NUMBER and c not in "\r\n" and nxt == LETTER:  # [^\r\n\p{L}\p{N}]?\p{L}+
            j = _run(kinds, i + 1, LETTER)
        elif k == NUMBER:
            j = _run(kinds, i, NUMBER, max_digits)
        elif k == OTHER or (c == " " and nxt == OTHER):  # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
            j = _run(kinds, i + 1, OTHER)
            while j < n and text[j] in "\r\n":
                j += 1
        else:
            j = _whitespace_end(text, kinds, i, True)
        out.append(text[i:j])
        i = j
    return out


def split_qwen2(text):
    """Pieces of `text` under QWEN2_PATTERN."""
    return _split_qwen_like(text, 1)


def split_llama3(text):
    """Pieces of `text` under LLAMA3_PATTERN."""
    return _split_qwen_like(text, 3)


def _split_gpt2_like(text, digits_apart):
    kinds = [char_class(c) for c in text]
    n, i, out = len(text), 0, []
    while i < n:
        c = text[i]
        nxt = kinds[i + 1] if i + 1 < n else SPACE
        start = i + 1 if c == " " and nxt != SPACE and not (digits_apart and nxt == NUMBER) else i
        if c == "'" and (j := _contraction(text, i, False)):
            pass
        elif digits_apart and kinds[start] == NUMBER:
            j = start + 1
        elif kinds[start] != SPACE:  # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
            j = _run(kinds, start, kinds[start])
        else:
            j = _whitespace_end(text, kinds, i, False, digits_apart)
        out.append(text[i:j])
        i = j
    return out


def split_gpt2(text):
    """Pieces of `text` under GPT2_PATTERN (ByteLevel's use_regex=true)."""
    return _split_gpt2_like(text, False)


def split_smollm(text):
    """tokenizers' Digits(individual_digits=True) followed by GPT2_PATTERN (SmolLM2's
    tokenizer.json, llama.cpp's "smollm"), in one pass rather than two: every number character is a piece of its
    own, never takes the space before it, and a whitespace run before one ends as at the end of
    the text (the Digits split cut the text there)."""
    return _split_gpt2_like(text, True)


SPLIT_PATTERNS = {QWEN2_PATTERN: split_qwen2, GPT2_PATTERN: split_gpt2}


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table: byte-level BPE vocabularies are
    written in these characters, so a space is 'Ġ' and a newline 'Ċ'."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
