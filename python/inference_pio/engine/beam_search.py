"""Beam search (LLM.beam_search): BeamSearchParams, the outputs, and the engine's side of it.

What it computes: for each prompt, transformers' beam search on that prompt alone -
generate(num_beams, length_penalty, early_stopping, num_return_sequences, do_sample=False,
max_new_tokens, min_new_tokens, eos_token_id) in transformers 5.23 (GenerationMixin._beam_search),
step for step, in the same float32 arithmetic for the scores:
  - beams_to_keep = max(2, 1 + number of stop tokens) * num_beams candidates per step: the best
    (beam, token) pairs by running score + log_softmax(logits) (the first step has one beam, the
    prompt: transformers' other beams start at -1e9 and add nothing while beams_to_keep <= V);
  - a candidate ending in a stop token, or reaching the length limit, is a finished hypothesis
    when it is among the first num_beams candidates, scored score / generated_len ** length_penalty
    (generated_len counts the stop token); the finished set keeps the num_beams best;
  - the first num_beams candidates that do not finish are the next step's beams, best first;
  - the search ends when no candidate goes on (the length limit), when early_stopping is True and
    num_beams hypotheses are finished, or when they are all finished and the best running beam
    cannot beat the worst of them: its score / L ** length_penalty with L its length so far, or,
    for early_stopping="never" with length_penalty > 0, the longest length still possible.
num_beams = 1 is greedy decoding, as transformers' generate does it then (it stops at the first
stop token); its score is the same formula. The hypotheses returned are the num_return_sequences
best finished ones, best first, their `score` the value transformers reports as sequences_scores.
The length limit is max_tokens new tokens (and max_model_len); min_tokens keeps every stop token
at -inf until that many tokens are generated (transformers' MinNewTokensLengthLogitsProcessor).

How: every live beam is a Sequence in the scheduler, so the beams of all requests, and ordinary
sampled requests, run as rows of one batched forward. After the forward, the rows of each beam
request (its beams are kept together in the running list, so their rows are adjacent) go to
ops.beam_topk: log-softmax, running scores and the top candidates of every request in one library
call over the logits, on their device; only the candidates come back. (Forks join the running
list directly: max_num_seqs limits admissions, not a request's beams.) Then, per request, the
transformers rules above in Python over those few candidates, and the new beams: a parent chosen
once goes on as it is (its token appended), a parent chosen again is forked - the child shares
all its KV blocks (BlockManager.fork) and the first write into the partly filled last block takes
a private copy of that block only (copy on write) - and a parent not chosen is freed. The prompt is
thus prefilled once and its blocks are shared by every beam.

A beam's row arrives without its group's when the scheduler left a beam of the group out of the
step (preempted, or the token budget ran out): the row is kept (a copy) and the beam waits out of
the scheduler, holding its blocks, until the group's last row comes. When the scheduler runs out of
blocks, waiting beams give theirs up before any sequence is preempted (evict; their kept rows
still count) and are recomputed when they go on."""
import math
import struct
from array import array
from dataclasses import dataclass, field

from .. import dtypes, ops
from ..tensor import Tensor
from .params import SamplingParams, _is_int, _is_real
from .sequence import Sequence, Status


def _f32(x):
    """x rounded to float32 (the arithmetic of transformers' float32 score tensors)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass
class BeamSearchParams:
    """How to run a beam search, with transformers' meaning of each field.

    num_beams: beams kept per step (1: greedy). max_tokens (>= 1): new tokens at most; min_tokens:
    stop tokens are not allowed before this many. length_penalty: a finished hypothesis scores
    sum(log-probs) / generated_len ** length_penalty (> 0 favours longer ones, < 0 shorter).
    early_stopping: True stops as soon as num_beams hypotheses are finished; False (transformers'
    default) stops when the best running beam, at its current length, cannot beat them;
    "never" with length_penalty > 0 assumes the longest possible length instead.
    num_return_sequences (<= num_beams): hypotheses returned, best first. Stop tokens: the model's
    end-of-sequence tokens (unless ignore_eos) and stop_token_ids; a hypothesis keeps its stop
    token (in token_ids, and in text unless it is a special token and skip_special_tokens)."""
    num_beams: int = 4
    max_tokens: int = 16
    min_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"BeamSearchParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "must be an integer >= 1")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1 (a beam search generates at least one token)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if not _is_real(self.length_penalty) or not math.isfinite(self.length_penalty):
            bad("length_penalty", "must be a finite number")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            bad("early_stopping", 'must be True, False or "never"')
        if not _is_int(self.num_return_sequences) or not 1 <= self.num_return_sequences <= self.num_beams:
            bad("num_return_sequences", f"must be an integer in [1, num_beams = {self.num_beams}]")
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")


@dataclass
class BeamHypothesis:
    """A finished beam: its new tokens (the stop token included), their text, its score
    (sum of log-probs / len(token_ids) ** length_penalty, transformers' sequences_scores) and
    finish_reason: "stop" (it ends in a stop token) or "length"."""
    token_ids: list
    text: str
    score: float
    finish_reason: str


@dataclass
class BeamSearchOutput:
    """The result of one prompt: num_return_sequences hypotheses, best first (text, token_ids,
    score and finish_reason are the best one's)."""
    request_id: int
    prompt_token_ids: list
    hypotheses: list

    @property
    def text(self):
        return self.hypotheses[0].text

    @property
    def token_ids(self):
        return self.hypotheses[0].token_ids

    @property
    def score(self):
        return self.hypotheses[0].score

    @property
    def finish_reason(self):
        return self.hypotheses[0].finish_reason


class BeamRequest:
    """A beam search request in the engine: its live beams (Sequences; beam b is row b of the
    request's group in a step), their running scores, and its finished hypotheses."""

    def __init__(self, request_id, prompt_ids, params, stop_ids, max_len):
        self.request_id, self.params = request_id, params
        self.prompt_ids = list(prompt_ids)
        self.stop_ids = stop_ids
        self.max_len = max_len  # prompt + generated tokens at most (transformers' max_length)
        self.num_candidates = max(2, 1 + len(stop_ids)) * params.num_beams  # beams_to_keep
        # what its beams' Sequences ask of the sampler (their rows are sampled when batched with
        # sampled requests, and the ids ignored): the cheapest, greedy
        self.seq_params = SamplingParams(max_tokens=params.max_tokens, temperature=0.0)
        self.live, self.scores = [], []  # the beams and their sums of log-probs (float32 values)
        self.finished = []  # (score, token_ids, finish_reason), best first, at most num_beams
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.rows = {}  # beam -> a copy of its logits row, while others of the group are computed
        self.done = False

    @property
    def num_generated(self):
        return self.live[0].num_tokens - len(self.prompt_ids)

    def candidates_wanted(self, vocab):
        rows = len(self.live)
        return 1 if self.params.num_beams == 1 else min(self.num_candidates, rows * vocab)

    def hypotheses(self):
        """(score, token_ids, finish_reason) of the num_return_sequences best, best first."""
        return self.finished[:self.params.num_return_sequences]


class BeamSearch:
    """The engine's beam requests (LLMEngine.beams): adds them, advances them after a forward
    (step), and frees them."""

    def __init__(self, engine):
        self.engine = engine
        self.requests = []  # not done yet
        self.num_waits = 0      # beams that waited out of the scheduler for their group's rows
        self.num_evictions = 0  # of those, beams that gave their blocks up meanwhile
        engine.scheduler.reclaim = self.evict

    def add(self, request_id, prompt_ids, params):
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"beam search takes BeamSearchParams, got {type(params).__name__}")
        eng = self.engine
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eng.eos_ids))
        req = BeamRequest(request_id, prompt_ids, params, stop,
                          min(len(prompt_ids) + params.max_tokens, eng.max_model_len))
        if eng.model.device != "cpu" and (params.num_beams > 256 or req.num_candidates > 1024
                                          or (params.min_tokens and len(stop) > 128)):
            raise ValueError(f"on a GPU a beam search keeps at most 256 beams and 1024 candidates per step "
                             f"(max(2, 1 + stop tokens) * num_beams) and suppresses at most 128 stop tokens "
                             f"for min_tokens; got num_beams={params.num_beams} with {len(stop)} stop tokens")
        first = self._sequence(req, prompt_ids)
        req.live, req.scores = [first], [0.0]
        eng.scheduler.add(first)
        self.requests.append(req)
        return req

    def _sequence(self, req, token_ids):
        seq = Sequence(req.request_id, token_ids, req.seq_params, ())
        seq.num_prompt_tokens = len(req.prompt_ids)
        seq.beam = req
        return seq

    # ---- after a forward ----
    def step(self, logits, rows):
        """rows: [(row of logits, beam Sequence)] of the beams whose tokens the forward completed.
        Advances every request whose live beams all have their row now."""
        at = {seq: i for i, seq in rows}
        ready = []
        for req in dict.fromkeys(seq.beam for _, seq in rows):
            if all(s in at or s in req.rows for s in req.live):
                ready.append(req)
                continue
            for s in req.live:  # wait for the others of the group, out of the scheduler
                if s in at:
                    req.rows[s] = logits[at[s]].clone()
                    self.engine.scheduler.running.remove(s)
                    self.num_waits += 1
        if not ready:
            return
        vocab = logits.shape[1]
        results = {}
        adjacent = []  # requests whose rows lie in logits in beam order: one call for all
        for req in ready:
            first = at.get(req.live[0])
            if not req.rows and [at[s] for s in req.live] == list(range(first, first + len(req.live))):
                adjacent.append((req, first))
        if adjacent:
            beam_scores = array("f", bytes(4 * logits.shape[0]))
            for req, first in adjacent:
                beam_scores[first:first + len(req.live)] = array("f", req.scores)
            groups = [(first, len(req.live), req.candidates_wanted(vocab)) for req, first in adjacent]
            out = self._candidates(logits, beam_scores, groups, [req for req, _ in adjacent], vocab)
            results.update(zip((req for req, _ in adjacent), out))
        for req in ready:
            if req not in results:  # its rows gathered in beam order
                rows_t = Tensor.empty((len(req.live), vocab), dtype=logits.dtype, device=logits.storage.device)
                for b, s in enumerate(req.live):
                    rows_t[b] = req.rows[s] if s in req.rows else logits[at[s]]
                groups = [(0, len(req.live), req.candidates_wanted(vocab))]
                results[req] = self._candidates(rows_t, array("f", req.scores), groups, [req], vocab)[0]
        for req in ready:
            req.rows.clear()
            self._advance(req, *results[req], vocab)

    def _candidates(self, logits, beam_scores, groups, reqs, vocab):
        """[(scores, flat ids)] per group from one ops.beam_topk call (the k best of each)."""
        suppress = [sorted(t for t in req.stop_ids if t < vocab)
                    if req.num_generated < req.params.min_tokens else [] for req in reqs]
        width = max(len(s) for s in suppress)
        sup = None
        if width:
            sup = Tensor.frombuffer(array("i", [t for s in suppress for t in s + [-1] * (width - len(s))]),
                                    dtypes.int32).view(len(reqs), width)
        k = max(g[2] for g in groups)
        g = Tensor.frombuffer(array("i", [v for grp in groups for v in grp]), dtypes.int32).view(len(groups), 3)
        scores, ids = ops.beam_topk(logits, Tensor.frombuffer(beam_scores, dtypes.float32), g, k, sup)
        return list(zip(scores.tolist(), ids.tolist()))

    def _advance(self, req, scores, ids, vocab):
        """One step of transformers' beam search for req, from its candidates (best first)."""
        p = req.params
        n, lp, plen = p.num_beams, float(p.length_penalty), len(req.prompt_ids)
        gen = req.num_generated
        cands = [(s, f // vocab, f % vocab) for s, f in zip(scores, ids) if f >= 0]
        at_limit = plen + gen + 1 >= req.max_len
        hits = [at_limit or t in req.stop_ids for _, _, t in cands]
        penalty = _f32((gen + 1) ** lp)
        if n == 1:  # greedy: the best token, and done at a stop token or the limit
            cands, hits = cands[:1], hits[:1]
        new = [(_f32(s / penalty), self._tokens(req, b) + [t], "stop" if t in req.stop_ids else "length")
               for (s, b, t), h in list(zip(cands, hits))[:n] if h]
        if new:
            req.finished = sorted(req.finished + new, key=lambda h: -h[0])[:n]  # stable: older first
        running = [c for c, h in zip(cands, hits) if not h][:n]
        if running and len(req.finished) == n:
            best_len = req.max_len - plen if p.early_stopping == "never" and lp > 0 else gen + 1
            best = _f32(running[0][0] / _f32(best_len ** lp))
            req.improvable = req.improvable and best > min(h[0] for h in req.finished)
        if not running or not req.improvable or (len(req.finished) == n and p.early_stopping is True):
            self._finish(req)
        else:
            self._continue(req, running)

    def _tokens(self, req, b):
        return req.live[b].token_ids[len(req.prompt_ids):]

    def _continue(self, req, running):
        """The next step's beams: running = [(score, parent beam, token)], best first."""
        sch, old = self.engine.scheduler, req.live
        pos = min((i for i, s in enumerate(sch.running) if s.beam is req), default=len(sch.running))
        children, taken = [], set()
        for score, b, t in running:  # forks first, while the parents hold their tokens as they were
            parent = old[b]
            if b in taken:
                child = self._sequence(req, parent.token_ids)
                if parent.block_table and parent.num_computed == parent.num_tokens:
                    self.engine.blocks.fork(parent, child)
            else:
                taken.add(b)
                child = parent
            children.append((child, t))
        for b, s in enumerate(old):
            if b not in taken:
                s.status = Status.FINISHED
                sch.finish(s)
        sch.running[:] = [s for s in sch.running if s.beam is not req]
        resident, recompute = [], []
        for child, t in children:
            child.token_ids.append(t)
            if child.block_table and child.num_computed == child.num_tokens - 1:
                child.status = Status.RUNNING
                resident.append(child)
            else:  # its parent gave its blocks up while waiting: all its tokens are computed again
                child.status = Status.WAITING
                recompute.append(child)
        sch.running[pos:pos] = resident
        for child in reversed(recompute):
            sch.waiting.appendleft(child)
        req.live = [c for c, _ in children]
        req.scores = [s for s, _, _ in running]

    def _finish(self, req, reason=None):
        for s in req.live:
            s.status, s.finish_reason = Status.FINISHED, reason
            self.engine.scheduler.finish(s)
        req.live, req.scores = [], []
        req.rows.clear()
        req.done = True
        self.requests.remove(req)

    def abort(self, req):
        """Drops a request (its beams and blocks); the hypotheses finished so far stay."""
        if not req.done:
            self._finish(req, "abort")

    def evict(self):
        """Frees the blocks of the beams waiting for their group (their rows are kept; they are
        computed again when they go on). Returns whether any were freed: the scheduler calls
        this (Scheduler.reclaim) before it preempts a sequence, or when it is all that keeps a
        waiting one out of an empty step."""
        freed = False
        for req in self.requests:
            for s in req.rows:
                if s.block_table:
                    self.engine.blocks.free(s)
                    self.num_evictions += 1
                    freed = True
        return freed
