"""A request in flight: its tokens, how many of them are in the KV cache, its blocks."""
import enum
import random


class Status(enum.Enum):
    WAITING = "waiting"    # not admitted yet, or preempted (its cache was dropped)
    RUNNING = "running"
    FINISHED = "finished"


PLACEHOLDER = -1  # a token sampled on the device and not read back yet (overlapped decode)


class Sequence:
    def __init__(self, request_id, prompt_ids, params, eos_ids):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_ids))
        self.num_computed = 0       # tokens whose keys and values are in the cache
        self.num_pending = 0        # PLACEHOLDERs ending token_ids: launched steps not read back yet
        self.block_table = []       # cache blocks holding positions [i * block_size, (i+1) * block_size)
        self.status = Status.WAITING
        self.finish_reason = None
        # A seeded request draws from its own generator, so its samples do not depend on what
        # else is batched with it.
        self.rng = random.Random(params.seed)
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
        """Finishes the sequence if its n-th token, token_id, ends it."""
        if token_id in self.stop_ids:
            self.finish("stop")
        elif n - self.num_prompt_tokens >= self.params.max_tokens or n >= max_len:
            self.finish("length")

    def add_logprobs(self, entry):
        """Records the logprobs of the token just appended or filled in (dict, chosen first)."""
        self.logprobs.append(entry)
        self.cumulative_logprob += next(iter(entry.values()))

    def finish(self, reason):
        self.status, self.finish_reason = Status.FINISHED, reason
        if self.num_pending:  # tokens of steps launched past the end: never reported
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0
