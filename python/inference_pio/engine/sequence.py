"""A request in flight: its tokens, how many of them are in the KV cache, its blocks."""
import enum
import random


class Status(enum.Enum):
    WAITING = "waiting"    # not admitted yet, or preempted (its cache was dropped)
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id, prompt_ids, params, eos_ids):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_ids))
        self.num_computed = 0       # tokens whose keys and values are in the cache
        self.block_table = []       # cache blocks holding positions [i * block_size, (i+1) * block_size)
        self.status = Status.WAITING
        self.finish_reason = None
        # A seeded request draws from its own generator, so its samples do not depend on what
        # else is batched with it.
        self.rng = random.Random(params.seed)

    @property
    def num_tokens(self):
        return len(self.token_ids)

    @property
    def num_uncomputed(self):
        return len(self.token_ids) - self.num_computed

    @property
    def completion_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    def append(self, token_id, max_len):
        """Adds a sampled token and decides whether the sequence is done."""
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            self.finish("stop")
        elif len(self.token_ids) - self.num_prompt_tokens >= self.params.max_tokens or len(self.token_ids) >= max_len:
            self.finish("length")

    def finish(self, reason):
        self.status, self.finish_reason = Status.FINISHED, reason
