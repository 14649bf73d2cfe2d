"""Request parameters and outputs: the names users of vLLM expect, plus self-evaluation scores."""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, field, replace

from engine.errors import InvalidRequestError
from kernels.sampling import GREEDY_BELOW

MAX_LOGPROBS = 20  # most alternatives per position a request may ask for (OpenAI's and vLLM's bound)


@dataclass
class SamplingParams:
    """How to sample one request. temperature=0 is greedy (so is any under 1e-5, as in vLLM);
    top_k=0 and top_p=1 disable those."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Score each finished sample with the self-evaluation suffix; None: only when n > 1.
    score: bool | None = None
    # Also score every sample in place after this many generated tokens (mid-generation).
    score_at: tuple[int, ...] = ()
    # Record each token's DeepConf confidence (minus the mean top-20 log-probability).
    confidence: bool = False
    # Record the most likely `logprobs` tokens and their log-probabilities at every generated
    # position (vLLM's logprobs); the sampled token's own log-probability is always recorded.
    logprobs: int = 0
    # Decode the generated tokens into text (vLLM's detokenize). False: deltas and outputs carry
    # the tokens with empty text (AsyncEngine's engine process leaves it to the server's).
    detokenize: bool = True

    def __post_init__(self) -> None:
        for name in ("max_tokens", "n", "top_k", "logprobs"):
            setattr(self, name, _int(name, getattr(self, name)))
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("temperature", "top_p"):
            _finite(name, getattr(self, name))
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            if not 0 <= self.seed < 1 << 64:
                raise InvalidRequestError(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("ignore_eos", "confidence", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.score is not None and not isinstance(self.score, bool):
            raise InvalidRequestError(f"score must be True, False or None, got {self.score!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (self.stop is None or isinstance(self.stop, (list, tuple))) or not all(
                isinstance(x, str) for x in self.stop or []):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        if not (self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple))):
            raise InvalidRequestError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = [_int("stop_token_ids entries", t) for t in self.stop_token_ids or []]
        if isinstance(self.score_at, int):
            self.score_at = (self.score_at,)
        if not isinstance(self.score_at, (list, tuple)):
            raise InvalidRequestError(f"score_at must be a tuple of generated lengths, got {self.score_at!r}")
        self.score_at = tuple(sorted({_int("score_at checkpoints", c) for c in self.score_at}))
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.top_k < 1 << 31,
             f"top_k must be in [0, 2**31) (0, or one >= the vocabulary, disables it), got {self.top_k}"),
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (self.detokenize or not self.stop, "stop strings need detokenize=True (they match text)"),
            (all(c > 0 for c in self.score_at), "score_at checkpoints must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def wants_score(self) -> bool:
        return self.n > 1 if self.score is None else self.score


def _int(name: str, value) -> int:
    """An integer (numpy's too), not a float or bool that would be truncated or mistaken for one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, prompt index, ...), well spread, stable across runs."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def seeds_per_prompt(params: SamplingParams, count: int, first: int = 0) -> list[SamplingParams]:
    """params for `count` prompts, the fixed seed made distinct per prompt (by index, from
    `first`). One seed shared by many prompts gives sample i of every prompt the same random draws,
    which correlates them; this keeps runs reproducible and pairs runs that use the same seed."""
    if params.seed is None:
        return [params] * count
    return [replace(params, seed=mix_seed(params.seed, first + j)) for j in range(count)]


@dataclass
class Sample:
    """One generated response. score = p_no / (p_yes + p_no), None when not scored."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "pruned" (cut by a policy), "error"
    score: float | None = None
    p_yes: float | None = None
    p_no: float | None = None
    checkpoint_scores: list[tuple[int, float]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    # per generated token, the most likely (token id, log-probability) pairs (params.logprobs)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # generated tokens when a policy pruned it; a sample that had ended before the policy's
    # decision keeps its finish reason (Prune ranks every sample that went on past a checkpoint)
    pruned_at: int | None = None
    temperature: float | None = None
    value: float | None = None  # the policy scorer's value (self-evaluation score by default)


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    generated_tokens: int = 0
    score_calls: int = 0
    suffix_tokens: int = 0
    cached_scores: int = 0  # scores taken from the score cache (no suffix computed): not in score_calls
    preemptions: int = 0
    latency_s: float = 0.0
    samples_drawn: int = 0
    samples_pruned: int = 0  # dropped from the pick by a policy (cut, or ended before its decision)
    tokens_saved: int = 0  # against full best-of-N (policies): see engine.policies


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    samples: list[Sample]
    stats: RequestStats = field(default_factory=RequestStats)
    best_index: int | None = None  # set by a policy: the sample its scorer picked
    error: str | None = None  # the request failed: its samples end with finish reason "error"

    @property
    def best(self) -> Sample:
        """The policy's pick, else the highest-scored sample, else the first."""
        if self.best_index is not None:
            return next(s for s in self.samples if s.index == self.best_index)
        scored = [s for s in self.samples if s.score is not None]
        if not scored:
            return self.samples[0]
        return max(scored, key=lambda s: s.score)

    @property
    def text(self) -> str:
        return self.best.text


@dataclass(slots=True)
class SampleDelta:
    """What one sample added in one step. finish_reason is set once, when its generation ended;
    score (score, p_yes, p_no) once, when its end score landed."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    score: tuple[float, float, float] | None = None
    checkpoint_scores: list[tuple[int, float]] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    def extend(self, later: SampleDelta) -> None:
        """Append what the same sample added in a later step."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        self.top_logprobs += later.top_logprobs
        self.checkpoint_scores += later.checkpoint_scores
        self.finish_reason = later.finish_reason or self.finish_reason
        self.score = later.score or self.score

    def __reduce__(self):
        # The engine process pickles every step's deltas to the server's: as a constructor call
        # this takes 2.5x less time to dump and 2x less to load than a slots dataclass's state.
        return SampleDelta, (self.index, self.token_ids, self.text, self.logprobs, self.finish_reason,
                             self.score, self.checkpoint_scores, self.top_logprobs)


@dataclass(slots=True)
class RequestDelta:
    """A request's changes in one step; the last one has finished=True and the full output."""

    request_id: int
    samples: list[SampleDelta] = field(default_factory=list)
    finished: bool = False
    output: RequestOutput | None = None

    def merge(self, later: RequestDelta) -> RequestDelta:
        """One delta with this one's changes then a later step's (a consumer that fell behind
        takes the steps it missed at once); `later` is consumed."""
        mine = {d.index: d for d in self.samples}
        for d in later.samples:
            if d.index in mine:
                mine[d.index].extend(d)
            else:
                self.samples.append(d)
                mine[d.index] = d
        self.finished, self.output = later.finished, later.output
        return self

    def __reduce__(self):  # as SampleDelta's
        return RequestDelta, (self.request_id, self.samples, self.finished, self.output)


class TokenDeltas:
    """A step's most common sample deltas as rows: a sample that drew one token and nothing else
    new (no end, score or top logprobs), with its text and logprob. rows: (request_id, sample
    index, token, text, logprob) each. A request's other changes in the step, if any, come in a
    RequestDelta beside them; `merge_into` joins the two.

    The engine process sends these rows rather than the deltas (AsyncEngine.start): at batch 256
    they pickle in a few percent of the deltas' time, and the server's process builds the
    objects (bench/host_overhead.py, rows b256+process and b256+process-objects)."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[tuple[int, int, int, str, float]] | None = None):
        self.rows = [] if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def deltas(self) -> list[RequestDelta]:
        """One RequestDelta per request, its samples in row order."""
        by_request: dict[int, RequestDelta] = {}
        for rid, index, token, text, logprob in self.rows:
            sample = SampleDelta(index, [token], text, [logprob], None, None, [], [])
            d = by_request.get(rid)
            if d is None:
                by_request[rid] = RequestDelta(rid, [sample])
            else:
                d.samples.append(sample)
        return list(by_request.values())

    def merge_into(self, deltas: list[RequestDelta]) -> list[RequestDelta]:
        """deltas (the step's others, one per request) with these rows joined in: a request's rows
        go into its delta (samples then ordered by index), or after them as a delta of their own."""
        if not self.rows:
            return deltas
        mine = {d.request_id: d for d in self.deltas()}
        out = []
        for d in deltas:
            extra = mine.pop(d.request_id, None)
            if extra is not None:
                d.samples = sorted(d.samples + extra.samples, key=lambda s: s.index)
            out.append(d)
        return out + list(mine.values())

    def __reduce__(self):
        return TokenDeltas, (self.rows,)
