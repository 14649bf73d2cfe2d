"""Continuous batching over the block manager, which only the scheduler mutates. Each step takes
decodes, prefill chunks and self-evaluation suffixes within a token budget; sequences join and
leave between steps; when blocks run out the youngest sequences are preempted (freed, recomputed
later). schedule() places the step's tokens and returns plain data (a StepInput for the runner);
update_from_output() takes the sampled tokens and scores back."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from engine._core import BlockManager
from engine.selfeval import SelfEvalSpec
from engine.sequence import SeqStatus, Sequence, sample_seed
from engine.step_input import StepInput, prepare_decode, prepare_step

_RUNNING = SeqStatus.RUNNING  # a global is read faster than an enum member (Python 3.11)


class ScoreCache:
    """Self-evaluation scores by the token ids scored (prompt and response so far), the least
    recently used dropped once the keys hold more than max_tokens tokens in all. Keys are the
    whole token tuples, compared in full (no hash collisions)."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.tokens = max_tokens, 0
        self._scores: OrderedDict[tuple[int, ...], tuple[float, float, float]] = OrderedDict()
        # (key, the entry it replaced or dropped or None) for each change since begin(): undo()
        # takes a step's changes back with the step (a probe's too), so an undone step leaves the
        # cache holding what it held (its least-recently-used order may differ: once the cache is
        # full, which entry goes next may then differ from an uninterrupted run's).
        self._journal: list = []

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, token_ids) -> tuple[float, float, float] | None:
        key = tuple(token_ids)
        score = self._scores.get(key)
        if score is not None:
            self._scores.move_to_end(key)
        return score

    def put(self, token_ids, score: tuple[float, float, float]) -> None:
        key = tuple(token_ids)
        if len(key) > self.max_tokens:
            return
        self._journal.append((key, self._scores.get(key)))
        if key in self._scores:
            self._scores.move_to_end(key)
        else:
            self.tokens += len(key)
        self._scores[key] = score
        while self.tokens > self.max_tokens:
            old, value = self._scores.popitem(last=False)
            self._journal.append((old, value))
            self.tokens -= len(old)

    def begin(self) -> None:
        self._journal = []

    def undo(self) -> None:
        """Take back every change since begin(), latest first."""
        for key, value in reversed(self._journal):
            if value is None:
                if self._scores.pop(key, None) is not None:
                    self.tokens -= len(key)
            else:
                if key not in self._scores:
                    self.tokens += len(key)
                self._scores[key] = value
        self._journal = []


@dataclass
class SchedulerOutput:
    """One step: what the runner computes (step) and what the results mean. The first
    len(sample_seqs) logit rows are next-token rows of those samples (a root's last row once per
    sample forked off it), the next len(score_seqs) rows are self-evaluation score rows."""

    step: StepInput | None = None
    seqs: list[Sequence] = field(default_factory=list)
    num_real: list[int] = field(default_factory=list)  # prompt/response tokens of each chunk
    suffixes: list[tuple[int, ...]] = field(default_factory=list)  # self-evaluation suffix or ()
    sample_seqs: list[Sequence] = field(default_factory=list)
    score_seqs: list[Sequence] = field(default_factory=list)
    decodes: int = 0  # the first `decodes` seqs each sample their next token off their last one
    cached_scores: int = 0  # scores the cache gave while scheduling (a step may then have no rows)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, spec: SelfEvalSpec, max_batch_tokens: int,
                 max_num_seqs: int, max_model_len: int, eos_token_ids: set[int],
                 prefix_caching: bool = True, cache_namespace: int = 0, score_cache_tokens: int = 0):
        self.bm = block_manager
        self.score_cache = ScoreCache(score_cache_tokens) if score_cache_tokens else None
        self.prefix_caching = prefix_caching
        self.cache_namespace = cache_namespace
        self.spec = spec
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.only = None  # a Request: schedule its sequences alone (to find who makes a step fail)
        # Requests whose text or end is due since the engine last cleared it: a sample ended
        # (finished or released), or took a token that stop strings must see. A step that
        # reports only finished requests looks at these alone.
        self.changed: set = set()
        self._seq_ids = 0

    def new_seq_id(self) -> int:
        self._seq_ids += 1
        return self._seq_ids - 1

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning ---------------------------------------------------------------------
    def _plan(self, seq: Sequence, budget: int) -> tuple[int, tuple[int, ...]]:
        """How many real tokens (and which suffix) seq computes this step within budget."""
        n = seq.num_uncomputed
        if seq.pending_score:
            suffix = self.spec.suffix_after(seq.token_ids[-1])
            if n + len(suffix) <= budget:
                return n, suffix
            # The score must see exactly this length: never sample past it before scoring.
            return (min(n, budget), ()) if not seq.generating else (min(n - 1, budget), ())
        return min(n, budget), ()

    def preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.request.stats.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Free a sequence's blocks and take it out of the queues; it is FINISHED."""
        if seq.seq_id in self.bm:
            self.bm.free(seq.seq_id)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.changed.add(seq.request)

    def schedule(self, layout: bool = True) -> SchedulerOutput:
        """Pick the step's sequences and (layout) place their tokens: out.step is the StepInput.
        layout=False leaves that to a later self.layout(out) (to time the two apart)."""
        # Not in a probe (`only`: EngineCore._isolate): it must change nothing it does not undo.
        served = self._serve_cached_scores() if self.score_cache and self.only is None else 0
        out = self._schedule_once()
        out.cached_scores = served
        while not out.seqs and self.waiting and self.running and self.only is None:
            # Nothing running has work (a root whose samples were preempted, say) yet it holds
            # the blocks the queue's head needs: free the youngest and try again.
            self.preempt(self.running[-1])
            out = self._schedule_once()
        if layout:
            self.layout(out)
        return out

    def _serve_cached_scores(self) -> int:
        """Sequences waiting for a score the cache holds (the same tokens scored before), running
        or next in the queue, take it now: no suffix is computed, and the step runs them as it
        would after a scored step (a generating one decodes its next token; one whose generation
        ended, or that only asked for a score, is released)."""
        cache, served = self.score_cache, 0
        waiting = itertools.islice(self.waiting, self.max_num_seqs)  # those this step may admit
        for seq in [s for s in itertools.chain(self.running, waiting) if s.pending_score]:
            score = cache.get(seq.token_ids)
            if score is not None:
                seq.pending_score = False
                seq.request.stats.cached_scores += 1
                self._record_score(seq, score)
                served += 1
        return served

    def _record_score(self, seq: Sequence, score: tuple[float, float, float]) -> None:
        """A score of seq at its current tokens: a checkpoint score while it generates (or at a
        requested checkpoint), its end score once it ended (then released)."""
        if seq.generating or seq.num_generated in seq.request.score_at:
            seq.checkpoint_scores.append((seq.num_generated, score[0]))
        if not seq.generating:
            seq.score = score
            self.release(seq)

    def _schedule_once(self) -> SchedulerOutput:
        out = SchedulerOutput()
        decodes = self._plan_decodes(out)
        budget = self.max_batch_tokens - len(out.seqs)
        reserved = decodes or 0  # blocks promised to sequences already in the batch
        i = 0 if decodes is None else len(self.running)  # else every running one is planned
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self.only is not None and seq.request is not self.only:
                i += 1
                continue
            n, suffix = self._plan(seq, budget)
            if n + len(suffix) == 0:
                i += 1
                continue
            need = self.bm.blocks_needed(seq.seq_id, n + len(suffix))
            while need > self.bm.num_free_blocks - reserved and self.running[-1] is not seq:
                self.preempt(self.running[-1])
            if need > self.bm.num_free_blocks - reserved:
                self.preempt(seq)  # it is the youngest: wait for older sequences to finish
                break
            self._take(out, seq, n, suffix)
            budget -= n + len(suffix)
            reserved += need
            i += 1
        # A policy's root holds its prompt's cache but computes nothing after it: it takes no slot
        # (with max_num_seqs=1 it would keep its own preempted samples out for good).
        roots = self.running_roots() if self.waiting else 0
        while budget > 0 and len(self.running) - roots < self.max_num_seqs:
            seq = self._head()
            if seq is None:
                break
            cached = self._admit(seq)
            n, suffix = self._plan(seq, budget)
            need = self.bm.blocks_needed(seq.seq_id, n + len(suffix))
            if (n + len(suffix) == 0 or need > self.bm.num_free_blocks - reserved
                    or self._block_in_flight(seq, cached, out)):
                self.bm.free(seq.seq_id)  # cached blocks it took go back to the LRU list
                seq.num_computed = 0
                break
            stats = seq.request.stats
            stats.cached_prompt_tokens = max(stats.cached_prompt_tokens, min(cached, seq.request.num_prompt))
            if self.waiting[0] is seq:
                self.waiting.popleft()
            else:
                self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            roots += seq.is_root
            self._take(out, seq, n, suffix)
            budget -= n + len(suffix)
            reserved += need
        return out

    def _plan_decodes(self, out: SchedulerOutput) -> int | None:
        """The common step at once: every running sequence samples its next token off its last
        one or has nothing to compute, and the free blocks cover them all, so the loop over the
        running ones would take each in turn and preempt none. Returns the blocks reserved, or
        None (out untouched) where that loop must decide."""
        running = self.running
        if self.only is not None or len(running) > self.max_batch_tokens:
            return None
        seqs = []
        for seq in running:
            n = len(seq.token_ids) - seq.num_computed
            if n > 1 or seq.pending_score or (n and seq.finish_reason is not None):
                return None
            if n:
                seqs.append(seq)
        need = self.bm.blocks_needed_many([s.seq_id for s in seqs], 1)
        if need > self.bm.num_free_blocks:
            return None
        out.seqs, out.num_real, out.suffixes = seqs, [1] * len(seqs), [()] * len(seqs)
        out.decodes = len(seqs)
        return need

    def running_roots(self) -> int:
        """Running policy roots: they hold a prompt's cache and take no slot of max_num_seqs."""
        return sum(s.is_root for s in self.running)

    def _head(self) -> Sequence | None:
        """The next waiting sequence to admit (of `only`'s request, when set)."""
        if self.only is None:
            return self.waiting[0] if self.waiting else None
        return next((s for s in self.waiting if s.request is self.only), None)

    def _admit(self, seq: Sequence) -> int:
        """Give a waiting sequence its cache entry, over cached blocks where its tokens start
        with some; returns the cached tokens (computed no more)."""
        if not self.prefix_caching:
            self.bm.allocate(seq.seq_id, 0)
            return 0
        cached = self.bm.allocate_prefix(seq.seq_id, seq.token_ids, self.cache_namespace)
        seq.num_computed = cached
        return cached

    def _block_in_flight(self, seq: Sequence, cached: int, out: SchedulerOutput) -> bool:
        """Whether another sequence in this step completes the block seq would compute next
        (the same tokens up to its end): seq waits one step and takes it from the cache instead
        of computing it twice."""
        if not self.prefix_caching:
            return False
        end = cached + self.bm.block_size
        if end > len(seq.token_ids) - 1:
            return False
        block = seq.token_ids[cached:end]
        return any(other.num_computed + n >= end and other.token_ids[cached:end] == block
                   and other.token_ids[:cached] == seq.token_ids[:cached]
                   for other, n in zip(out.seqs, out.num_real))

    def _cache_computed(self, seq: Sequence) -> None:
        """Register the full blocks of real tokens not yet hashed, once a step completed one
        (never a suffix: it is rolled back before this)."""
        done = self.bm.num_hashed_tokens(seq.seq_id)
        full = seq.num_computed // self.bm.block_size * self.bm.block_size
        if full > done:
            self.bm.cache_blocks(seq.seq_id, seq.token_ids[done:full])

    @staticmethod
    def _take(out: SchedulerOutput, seq: Sequence, n: int, suffix: tuple[int, ...]) -> None:
        out.seqs.append(seq)
        out.num_real.append(n)
        out.suffixes.append(suffix)

    def layout(self, out: SchedulerOutput) -> None:
        """Place the step's tokens in the cache, fork the samples that wait for a root whose
        prompt this step completes, and pick the logit rows (nothing to do for an empty step)."""
        if not out.seqs:
            return
        if out.decodes == len(out.seqs):  # the common step: no chunks, rows or forks to work out
            seqs = out.sample_seqs = list(out.seqs)
            out.step = prepare_decode(self.bm, [s.seq_id for s in seqs], [s.token_ids[-1] for s in seqs])
            return
        chunks, sample_rows, score_rows, forks = [], [], [], []
        end = 0
        for seq, n, suffix in zip(out.seqs, out.num_real, out.suffixes):  # once per sequence: lean
            start = seq.num_computed
            chunk = seq.token_ids[start:start + n]
            if suffix:
                chunk += suffix
            chunks.append(chunk)
            end += n + len(suffix)
            if n and start + n == len(seq.token_ids):  # seq.reaches_end(n)
                if seq.finish_reason is None:  # seq.samples_after(n)
                    sample_rows.append(end - len(suffix) - 1)
                    out.sample_seqs.append(seq)
                elif seq.is_root and seq.request.pending_forks:
                    forks.append((seq, end - 1))
            if suffix:
                score_rows.append(end - 1)
                out.score_seqs.append(seq)
        out.step = prepare_step(self.bm, [s.seq_id for s in out.seqs], chunks,
                                np.asarray(sample_rows + score_rows, dtype=np.int64),
                                [len(x) for x in out.suffixes] if score_rows else None)
        # Forked after the root's tokens are placed: the samples share its blocks, computed in
        # this step, and take their first token from its last row.
        rows = []
        for root, row in forks:
            for child in self.fork_pending(root.request, root_computed=len(root.token_ids)):
                if child.generating:
                    rows.append(row)
                    out.sample_seqs.append(child)
        if rows:
            out.step.logit_rows = np.concatenate([np.asarray(sample_rows + rows, dtype=np.int64),
                                                  np.asarray(score_rows, dtype=np.int64)])

    # ---- undoing a step -------------------------------------------------------------------
    def snapshot(self) -> tuple:
        """Everything a step may change on the Python side: the queues, and the requests of the
        sequences it may schedule (every running one, the waiting ones it may admit) with all
        their sequences."""
        # A step admits at most max_num_seqs (after preempting running ones, which are saved as
        # running); a probe (`only`) may admit any of its request's sequences.
        requests = {s.request for s in self.running}
        requests.update(s.request for s in itertools.islice(self.waiting, self.max_num_seqs))
        if self.only is not None:
            requests.add(self.only)
        requests = list(requests)
        seqs = [s for r in requests for s in r.seqs]
        if self.score_cache is not None:
            self.score_cache.begin()
        return (list(self.waiting), list(self.running), seqs, [s.state() for s in seqs], requests,
                [r.state() for r in requests])

    def restore(self, snapshot: tuple, clobbered: np.ndarray) -> None:
        """Put back a snapshot after the block manager rolled back; sequences holding a block
        whose KV the undone step may have overwritten are recomputed (preempted)."""
        waiting, running, seqs, seq_states, requests, request_states = snapshot
        if self.score_cache is not None:
            self.score_cache.undo()
        self.waiting, self.running = deque(waiting), list(running)
        for seq, state in zip(seqs, seq_states):
            seq.restore(state)
        for request, state in zip(requests, request_states):
            request.restore(state)
        if len(clobbered):
            bad = set(clobbered.tolist())
            for seq in [s for s in self.running if bad.intersection(self.bm.block_ids(s.seq_id).tolist())]:
                self.preempt(seq)

    # ---- forks --------------------------------------------------------------------------
    def fork_pending(self, request, root_computed: int | None = None) -> list[Sequence]:
        """Fork the samples waiting in request.pending_forks off its root. root_computed: the
        root's prompt is being completed in this step (samples take its last row); None: the
        root's cache is complete, so each sample rolls back its last prompt token and computes
        it again for its own next-token row. Returns the samples forked (none while the root's
        cache is incomplete)."""
        root = request.root
        if root_computed is None and (root.status is not SeqStatus.RUNNING
                                      or root.num_computed < len(root.token_ids)):
            return []
        children = []
        for temperature in request.pending_forks:
            index = len(request.seqs) - 1
            child = Sequence(self.new_seq_id(), request, request.prompt_ids, index,
                             sample_seed(request.seed, index))
            child.temperature = temperature
            request.seqs.append(child)
            request.stats.samples_drawn += 1
            self.bm.fork(root.seq_id, child.seq_id)
            if root_computed is None:
                self.bm.truncate(child.seq_id, len(root.token_ids) - 1)
                child.num_computed = len(root.token_ids) - 1
            else:
                child.num_computed = root_computed
            child.status = SeqStatus.RUNNING
            self.running.insert(self.running.index(root) + 1 + len(children), child)
            children.append(child)
            if request.params.max_tokens == 0:
                self.finish(child, "length")
        request.pending_forks.clear()
        if request.drawn >= request.max_samples:
            self.release(root)  # no more samples will fork off it
        return children

    # ---- results --------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, tokens: list[int], logprobs: list[float],
                           scores: list[tuple[float, float, float]]) -> None:
        """Account the computed tokens, roll every scored sequence back past its suffix, record
        scores, append the sampled tokens and apply the token stop rules."""
        bs, caching = self.bm.block_size, self.prefix_caching
        for seq, n, suffix in zip(out.seqs, out.num_real, out.suffixes):
            before = seq.num_computed
            seq.num_computed = before + n
            if suffix:
                self.bm.truncate(seq.seq_id, seq.num_computed)
                seq.pending_score = False
            if caching and seq.num_computed // bs > before // bs and seq.status is _RUNNING:
                self._cache_computed(seq)
        cache = self.score_cache
        for seq, suffix, score in zip(out.score_seqs, (x for x in out.suffixes if x), scores):
            stats = seq.request.stats
            stats.score_calls += 1
            stats.suffix_tokens += len(suffix)
            score = tuple(score)
            if cache is not None:  # the tokens scored: the sequence before this step's token
                cache.put(seq.token_ids, score)
            self._record_score(seq, score)
        eos, max_len = self.eos_token_ids, self.max_model_len
        for seq, token, logprob in zip(out.sample_seqs, tokens, logprobs):
            token_ids = seq.token_ids
            token_ids.append(token)
            seq.logprobs.append(logprob)
            request = seq.request
            request.stats.generated_tokens += 1
            # The token stop rules, inline: this runs once per sample per step.
            params, generated = request.params, len(token_ids) - request.num_prompt
            if params.stop:
                self.changed.add(request)
            if token in params.stop_token_ids or (not params.ignore_eos and token in eos):
                self.finish(seq, "stop")
            elif generated >= params.max_tokens or len(token_ids) >= max_len:
                self.finish(seq, "length")
            elif generated in request.score_at:
                seq.pending_score = True

    def finish(self, seq: Sequence, reason: str) -> None:
        """Generation ended: score the sample if asked (one more extend), else release it."""
        seq.finish_reason = reason
        self.changed.add(seq.request)
        if seq.request.wants_score or seq.num_generated in seq.request.score_at:
            seq.pending_score = True
        else:
            self.release(seq)

    def drop(self, seq: Sequence) -> None:
        """A policy prunes a sample: its blocks are freed at once. A live one ends with finish
        reason "pruned"; one whose generation had ended keeps its reason and loses a pending end
        score."""
        seq.pruned_at = seq.num_generated
        if seq.finish_reason is None:
            seq.finish_reason = "pruned"
        seq.pending_score = False
        seq.request.stats.samples_pruned += 1
        if seq.status is not SeqStatus.FINISHED:
            self.release(seq)
