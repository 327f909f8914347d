"""A request in flight: its tokens, how many of them are in the KV cache, its blocks, and (when
stop strings or a stream need it) its output text, decoded as the tokens arrive."""
import enum
import hashlib
import random


class Status(enum.Enum):
    WAITING = "waiting"    # not admitted yet, or preempted (its cache was dropped)
    RUNNING = "running"
    FINISHED = "finished"


PLACEHOLDER = -1  # a token sampled on the device and not read back yet (overlapped decode)


def sample_seed(seed, index):
    """The seed of sample `index` of a request seeded with `seed` (None: unseeded). Sample 0
    keeps the seed itself, so n=1 draws what it always drew; the others hash (seed, index)."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little")


class OutputText:
    """A sequence's new text, decoded as its tokens arrive (decoder: a tokenizer's incremental
    decoder, which holds the bytes of a partial UTF-8 character back), and searched for stop
    strings: text only ever holds whole characters, and is cut at the first stop string found.

    Only the window the new text can complete is searched: the last len(longest stop) - 1
    characters before it and the new text. Of several stop strings found in the same new text,
    the one that ends first wins (the one a reader of the characters in order meets first),
    the longest on a tie."""

    def __init__(self, decoder, stops=(), include_stop=False):
        self._decoder = decoder
        self.stops = tuple(stops)
        self._include = include_stop
        self._longest = max(map(len, self.stops), default=0)
        self.text = ""
        self.stop = None     # the stop string found
        self.done = False    # text is final

    @classmethod
    def make(cls, detokenizer, params, wanted=False):
        """The OutputText a request needs: one when it has stop strings or the text is `wanted`
        while it runs (a stream), else None. detokenizer: skip_special_tokens -> incremental
        decoder (the model's tokenizer), or None."""
        if not (params.stop or wanted):
            return None
        if detokenizer is None:
            if params.stop:
                raise ValueError("stop strings need the model's tokenizer (this model has none): "
                                 "use stop_token_ids")
            return None
        return cls(detokenizer(params.skip_special_tokens), params.stop, params.include_stop_str_in_output)

    def add(self, token_id, search=True):
        """Decodes one more token; returns the stop string it completes (then text is cut and
        final), or None. search=False only decodes (a stop token's own text)."""
        new = self._decoder.add(token_id)
        if not new or self.done:
            return None
        start = max(0, len(self.text) - self._longest + 1)
        self.text += new
        if not search:
            return None
        found = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (found is None or (i + len(s), i) < (found[0] + len(found[1]), found[0])):
                found = (i, s)
        if found is None:
            return None
        i, self.stop = found
        self.text = self.text[:i + len(self.stop) if self._include else i]
        self.done = True
        return self.stop

    def finish(self):
        """The sequence ended otherwise: a partial character left becomes U+FFFD."""
        if not self.done:
            self.text += self._decoder.finish()
            self.done = True

    def settled(self):
        """How many characters of text stay whatever comes next: all of them once done; else all
        but the longest ending that could still grow into a stop string (held back)."""
        n = len(self.text)
        if self.done:
            return n
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, n), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return n - hold


class Sequence:
    def __init__(self, request_id, prompt_ids, params, eos_ids, index=0, output=None):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.index = index          # which of the request's n samples
        self.output = output        # OutputText, or None: the text is decoded at the end
        self.eos_ids = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self.stop_ids = frozenset(params.stop_token_ids) | self.eos_ids
        self.stop_reason = None     # the stop string or stop_token_ids id that finished it
        self.num_computed = 0       # tokens whose keys and values are in the cache
        self.num_pending = 0        # PLACEHOLDERs ending token_ids: launched steps not read back yet
        self.block_table = []       # cache blocks holding positions [i * block_size, (i+1) * block_size)
        self.status = Status.WAITING
        self.finish_reason = None
        # A seeded request draws from its own generator, so its samples do not depend on what
        # else is batched with it; each of its n samples from its own.
        self.seed = sample_seed(params.seed, index)
        self.rng = random.Random(self.seed)
        self.beam = None            # the BeamRequest (beam_search.py) this is a beam of, if any
        # SamplingParams.logprobs: per generated token {token id: logprob}, the chosen one first
        self.logprobs = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.sampler_history = None  # (token_ids, its int32 copy): engine/sampler.py's, for penalties

    @property
    def num_tokens(self):
        return len(self.token_ids)

    @property
    def num_uncomputed(self):
        return len(self.token_ids) - self.num_computed

    @property
    def completion_ids(self):
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    def append(self, token_id, max_len):
        """Adds a sampled token and decides whether the sequence is done."""
        self.token_ids.append(token_id)
        self._decide(token_id, len(self.token_ids), max_len)

    def append_placeholder(self):
        """Adds a token that a launched step samples on the device; fill() puts it in."""
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def fill(self, token_id, max_len):
        """Puts in the oldest placeholder's token, then decides as append() does: on the tokens
        up to that one (a finished sequence drops the placeholders after it)."""
        n = len(self.token_ids) - self.num_pending + 1
        self.token_ids[n - 1] = token_id
        self.num_pending -= 1
        self._decide(token_id, n, max_len)

    def at_length_limit(self, max_len):
        """Whether the tokens (placeholders counted) reach max_tokens or max_len: the last one
        finishes the sequence whatever it is."""
        n = len(self.token_ids)
        return n - self.num_prompt_tokens >= self.params.max_tokens or n >= max_len

    def _decide(self, token_id, n, max_len):
        """Finishes the sequence if its n-th token, token_id, ends it: a stop or end token, a stop
        string its text completes (which outranks the length limits, as in vLLM), its length."""
        stop_string = None
        if self.output is not None:
            # stop strings count once min_tokens tokens are out, as in vLLM
            search = (token_id not in self.stop_ids
                      and n - self.num_prompt_tokens > self.params.min_tokens)
            stop_string = self.output.add(token_id, search)
        if token_id in self.stop_ids:
            self.finish("stop", None if token_id in self.eos_ids else token_id)
        elif stop_string is not None:
            self.finish("stop", stop_string)
        elif n - self.num_prompt_tokens >= self.params.max_tokens or n >= max_len:
            self.finish("length")

    def add_logprobs(self, entry):
        """Records the logprobs of the token just appended or filled in (dict, chosen first)."""
        self.logprobs.append(entry)
        self.cumulative_logprob += next(iter(entry.values()))

    def finish(self, reason, stop_reason=None):
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason
        if self.output is not None:
            self.output.finish()
        if self.num_pending:  # tokens of steps launched past the end: never reported
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0
