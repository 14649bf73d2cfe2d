"""EngineCore: requests in, per-step deltas out. One step is scheduler.schedule() -> StepInput ->
runner.execute() -> sampling and scores -> scheduler.update_from_output(), then incremental text,
stop strings and the policies. Requests are validated by the front (engine.api.Engine)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import threading
import time
import weakref

import numpy as np
import torch

import kernels
from engine._core import BlockManager
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, WorkerError
from engine.model.loader import load_model, load_tokenizer
from engine.model.lora import has_adapter, load_adapter
from engine.outputs import ROWED, OutputProcessor
from engine.policies.base import Policy, PolicyRun
from engine.policies.scorers import token_confidence
from engine.profiler import StepProfiler
from engine.runner import ModelRunner, blocks_that_fit
from engine.sampling import RequestDelta, SamplingParams, TokenDeltas, mix_seed
from engine.scheduler import Scheduler, SchedulerOutput
from engine.selfeval import SelfEvalSpec, build_spec, score_from_logits
from engine.sequence import Request, SeqStatus, Sequence, sample_seed
from engine.step_input import prepare_decode
from engine.tensor_parallel import TensorParallel, TensorParallelRunner
from kernels.sampling import GREEDY_BELOW

_no_phase = contextlib.nullcontext
_RUNNING, _FINISHED = SeqStatus.RUNNING, SeqStatus.FINISHED


class EngineCore:
    """Implements the policies' SampleHost (fork_samples, score_now, drop_sample, finish_request)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device, self.dtype = config.torch_device, config.torch_dtype
        # Tensor parallelism: this is rank 0; the other ranks run shards (engine.tensor_parallel).
        self.tp = TensorParallel(config) if config.tensor_parallel_size > 1 else None
        if self.tp is not None:  # an engine dropped without shutdown() still stops its ranks
            weakref.finalize(self, self.tp.shutdown)
        try:
            self._build(config)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, config: EngineConfig) -> None:
        shard = self.tp.shard if self.tp is not None else None
        self.model, self.hf_config = load_model(config.model, self.device, self.dtype, config.load_format,
                                                shard)
        self.tokenizer = load_tokenizer(config.model)
        if config.adapter is not None:
            load_adapter(self.model, config.adapter)
        self.spec: SelfEvalSpec = build_spec(self.tokenizer)
        if config.max_batch_tokens < len(self.spec.suffix_ids) + 1:
            raise InvalidRequestError(
                f"max_batch_tokens={config.max_batch_tokens} is below the self-evaluation suffix "
                f"({len(self.spec.suffix_ids)} tokens) plus one")
        cfg = self.model.config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        num_blocks = config.num_blocks or blocks_that_fit(self.model, config.block_size, self.dtype,
                                                          self.device, config.kv_cache_memory)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        graphs = "cuda" if config.use_cuda_graphs else None
        if self.tp is not None:  # every rank builds its runner (and captures its graphs) together
            self.tp.setup(num_blocks, self.max_model_len, graphs)
        self.runner = ModelRunner(self.model, self.device, self.dtype, num_blocks, config.block_size,
                                  self.max_model_len, graphs=graphs,
                                  max_graph_batch=config.max_num_seqs, adapter_loaded=has_adapter(self.model))
        if self.tp is not None:
            self.runner = TensorParallelRunner(self.runner, self.tp)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(self.block_manager, self.spec, config.max_batch_tokens,
                                   config.max_num_seqs, self.max_model_len, eos,
                                   prefix_caching=config.enable_prefix_caching,
                                   cache_namespace=_namespace(config.adapter),
                                   score_cache_tokens=config.score_cache_tokens)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler)
        self.requests: dict[int, Request] = {}
        self.rng = random.Random(config.seed)
        self._ready: list[Request] = []  # finished without a step (max_tokens=0, no score)
        # Requests whose results a step committed but did not deliver (an interrupt or error in
        # its text, policy or output phase): the next step delivers them, or they never come back.
        self._undelivered: dict[int, Request] = {}
        self._built: dict[int, RequestDelta] = {}  # deltas built by an interrupted output phase
        self._columns: _SampleColumns | None = None  # the last batch's sampling columns
        self.profiler: StepProfiler | None = None  # attach one to time each step's phases
        self.async_scheduling = config.async_scheduling
        self._flight: _Flight | None = None  # a step launched ahead, applied by the next step()
        self.ahead_steps = 0  # steps launched ahead (tests, benchmarks)
        self.ahead_rows_discarded = 0  # their rows of samples that had ended by then
        self._ahead_pause = 0  # steps left to run synchronously after a step was undone
        self._held: _HeldInterrupt | None = None  # Ctrl-C handling during a step (see the class)
        self._interrupt_pending = False  # a Ctrl-C that came after a step's deltas were out

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: int, prompt_ids: list[int], params: SamplingParams,
                    policy: Policy | None = None) -> Request:
        """Queue a validated request. n > 1 and policies fork their samples off one root that
        holds the prompt's cache; n == 1 is one sequence. All or nothing (a policy's begin may
        raise)."""
        try:
            return self._add_request(request_id, prompt_ids, params, policy)
        except BaseException:
            self.abort(request_id)
            raise

    def _add_request(self, request_id: int, prompt_ids: list[int], params: SamplingParams,
                     policy: Policy | None) -> Request:
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        if seed >= 1 << 63:  # the sampler's seeds are int64
            seed = mix_seed(seed)
        request = Request(request_id, prompt_ids, params, seed)
        self.requests[request_id] = request
        if policy is None and params.n == 1:
            seq = self._new_sample(request, prompt_ids, 0, sample_seed(seed, 0))
            if params.max_tokens == 0:
                self.scheduler.finish(seq, "length")
            if seq.status is SeqStatus.FINISHED:  # nothing to compute
                self._ready.append(request)
            else:
                self.scheduler.add(seq)
            return request
        request.plain = False
        root = Sequence(self.scheduler.new_seq_id(), request, prompt_ids, -1, seed)
        root.is_root, root.finish_reason = True, "root"
        request.root = root
        request.seqs.append(root)
        self.scheduler.add(root)
        if policy is None:
            request.pending_forks = [params.temperature] * params.n
            return request
        scorer = policy.scorer
        request.wants_score = scorer.needs_suffix
        if scorer.needs_suffix:
            request.score_at = tuple(sorted(set(request.score_at) | set(policy.checkpoints())))
        request.track_confidence = request.track_confidence or scorer.needs_confidence
        request.max_samples = policy.full_samples
        request.policy = PolicyRun(policy, self, request)
        policy.begin(request.policy)
        return request

    def _new_sample(self, request: Request, token_ids: list[int], index: int, seed: int) -> Sequence:
        seq = Sequence(self.scheduler.new_seq_id(), request, token_ids, index, seed)
        request.seqs.append(seq)
        return seq

    def abort(self, request_id: int) -> None:
        """Drop a request and free its blocks; it yields no output."""
        request = self.requests.pop(request_id, None)
        self._ready = [r for r in self._ready if r.request_id != request_id]
        if request is None:
            return
        request.pending_forks.clear()
        for seq in request.seqs:
            if seq.status is not SeqStatus.FINISHED:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (the engine cannot step afterwards)."""
        if self.tp is not None:
            self.tp.shutdown()

    # ---- the policies' interface (SampleHost) -----------------------------------------------
    def fork_samples(self, request: Request, temperatures: list[float]) -> None:
        request.pending_forks.extend(temperatures)
        self.scheduler.fork_pending(request)

    def score_now(self, request: Request) -> int:
        live = [s for s in request.samples if s.live]
        for seq in live:
            seq.pending_score = True
        return len(live)

    def drop_sample(self, seq: Sequence) -> None:
        self.scheduler.drop(seq)

    def finish_request(self, request: Request, best_index: int | None) -> None:
        for seq in request.samples:
            if seq.live:
                self.scheduler.drop(seq)
        request.pending_forks.clear()
        request.best_index = best_index
        if request.root is not None and request.root.status is not SeqStatus.FINISHED:
            self.scheduler.release(request.root)

    # ---- one step -----------------------------------------------------------------------
    def step(self, deltas: bool = True, rows: list | None = None) -> list[RequestDelta]:
        """Run one batch; returns a delta for every request that changed in it. If anything
        raises before the results are applied (Ctrl-C too), the step is undone: stepping on gives
        the tokens an uninterrupted run gives. deltas=False (callers that want only finished
        requests, as vLLM's FINAL_ONLY): only the finished requests' deltas, and text is decoded
        when a sample ends unless stop strings need it as it grows; a later deltas=True step
        carries what was skipped. rows (TokenDeltas.rows): each sample that drew one token and
        nothing else new goes there as a row rather than in a returned delta (a request may have
        both: TokenDeltas.merge_into joins them). With async scheduling each call applies one step and
        may leave the next decode step running on the device (see _step_transaction)."""
        if self._interrupt_pending:  # a Ctrl-C that came after the last step's deltas were out
            self._interrupt_pending = False
            raise KeyboardInterrupt
        held = self._held = _HeldInterrupt()
        try:
            return self._step(deltas, held, rows)
        finally:
            self._held = None
            if held.restore():
                self._interrupt_pending = True

    def _step(self, deltas: bool, held: _HeldInterrupt, rows: list | None) -> list[RequestDelta]:
        prof = self.profiler
        phase = prof.phase if prof is not None else _no_phase
        ready, self._ready = self._ready, []
        touched = {r.request_id: r for r in ready}
        touched.update(self._undelivered)
        flight = self._flight
        error = self._transaction(lambda: self._step_transaction(touched, phase, every=deltas), phase)
        if isinstance(error, BaseException):  # undone: the engine stays usable
            self._flight = flight
            self._cancel_flight()  # a step launched ahead is computed again, synchronously
            self._ahead_pause = 2  # this step and the next run synchronously (their probes find culprits)
            if isinstance(error, _AheadFailed):  # only the speculative launch failed: step again
                error = self._transaction(lambda: self._step_transaction(touched, phase, every=deltas), phase)
        if isinstance(error, BaseException):
            self._ready = ready + self._ready
            if isinstance(error, WorkerError):  # not a request's fault, and no step can run now
                raise error
            culprits = self._isolate() if isinstance(error, Exception) else []
            if not culprits:
                raise error
            for request in culprits:  # their own input makes any step fail: they end, others go on
                self._fail(request, f"a step with this request raised {error!r}")
                touched[request.request_id] = request
        for request in self.requests.values():
            if request.policy is not None and not request.policy.done:
                touched[request.request_id] = request
        self._undelivered = touched
        return self._deliver(touched, deltas, phase, held, rows)

    def _deliver(self, touched: dict[int, Request], deltas: bool, phase, held: _HeldInterrupt,
                 rows: list | None = None) -> list[RequestDelta]:
        """A step's text, policies and deltas (step's second half). A Ctrl-C that held back comes
        at the end, once every delta is built: they go out with the next step's. rows
        (TokenDeltas.rows): one-token sample deltas go there as rows (see step)."""
        lazy = not deltas
        outputs = self.outputs
        with phase("detokenize"):
            for request in touched.values():
                if not (deltas and request.plain):  # those: at once with their delta (decode_delta)
                    outputs.advance_text(request, lazy)
        with phase("policy"):
            for request in touched.values():
                if request.policy is not None and not request.policy.done:
                    try:
                        request.policy.policy.update(request.policy)
                    except Exception as e:  # a policy's own bug fails its request only
                        self._fail(request, f"policy {type(request.policy.policy).__name__} raised {e!r}")
                    self.outputs.advance_text(request, lazy)  # flush the text of samples it dropped
        with phase("output"):
            live = [r for r in touched.values() if r.request_id in self.requests and (deltas or r.finished)]
            # Deltas that an interrupted output phase built (their samples' counters moved on) go
            # out merged with this step's, or what they carried would never be streamed.
            built = {k: d for k, d in self._built.items() if k in self.requests}
            self._built = {}
            out = []
            journal, start = [], None
            delta, decode_delta = outputs.delta, outputs.decode_delta
            mark = len(rows) if rows is not None else 0
            try:
                for r in live:
                    start = len(journal)
                    d = None
                    into = rows if not built or r.request_id not in built else None  # else merged: objects
                    if r.plain:
                        d = decode_delta(r, journal, into)
                    if d is None:
                        if r.plain:
                            outputs.advance_text(r)
                        d = delta(r, journal, into)
                    if d is ROWED:
                        start = None
                        continue
                    if built:
                        earlier = built.pop(r.request_id, None)
                        if earlier is not None:
                            d = earlier.merge(d)
                    out.append(d)
                    start = None
                self._built = built  # not delivered in this step (a final-only step: not finished yet)
                for d in out:  # delivered: finished requests leave
                    if d.finished:
                        del self.requests[d.request_id]
                self._undelivered = {}
                held.release()  # a Ctrl-C held back during the step: raised here
            except BaseException:
                if start is not None:  # its delta is not kept: what it took is reported again
                    self.outputs.rewind(journal[start:])
                    while rows is not None and len(rows) > mark and rows[-1][0] == r.request_id:
                        rows.pop()  # its rows, if it got that far
                for r in live:  # finished ones that left come back: their deltas go out next step
                    if r.request_id not in self.requests and r.finished:
                        self.requests[r.request_id] = r
                if rows is not None:  # the rows this step added are deltas built too
                    out = TokenDeltas(rows[mark:]).merge_into(out)
                    del rows[mark:]
                self._built = {**built, **{d.request_id: d for d in out}}
                self._undelivered = touched
                raise
            return out

    def _transaction(self, body, phase=_no_phase) -> BaseException | None:
        """Run body all or nothing: on any exception (Ctrl-C too) undo it and return it."""
        with phase("snapshot"):
            snapshot = self.scheduler.snapshot()
            self.block_manager.begin()
        held = self._held
        try:
            if held is not None:
                held.live = True  # a Ctrl-C in the body raises at once: the step is undone
            body()
            if held is not None:
                held.live = False  # from here on it waits for the step's deltas
        except BaseException as e:
            if held is not None:
                held.live = False
            self.scheduler.restore(snapshot, self.block_manager.rollback())
            return e
        with phase("snapshot"):
            self.block_manager.commit()
        return None

    def _isolate(self) -> list[Request]:
        """After a failed step: the requests whose step fails even alone (each tried, undone)."""
        culprits = []
        for request in list(self.requests.values()):
            self.scheduler.only = request
            try:
                error = self._transaction(lambda: self._step_transaction({}, _no_phase, probe=True))
            finally:
                self.scheduler.only = None
            if isinstance(error, KeyboardInterrupt):
                raise error
            if error is not None and not isinstance(error, _ProbeDone):
                culprits.append(request)
        return culprits

    def _step_transaction(self, touched: dict, phase, probe: bool = False, every: bool = True) -> None:
        """Schedule, run, sample and update: all or nothing (the caller undoes a failure). Adds
        the requests in the step to touched; every=False: only those whose text or end is due
        (scheduler.changed), the rest wait for a later step.

        Async scheduling (config.async_scheduling): when the step is a plain decode step whose
        samples all stay plain decodes after it (whatever tokens they draw), the next step goes
        to the device before this one's tokens come back to the host: its input tokens are this
        step's sampled tokens, still on the device (vLLM V1's async scheduling). The host then
        applies this step while the device computes the next; the next call applies that one.
        A sample that this step ends (a stop token or string, a policy's drop) has its row of
        the next step discarded and its cache cut back. Work that arises between steps (a
        request added while a step is in flight, an end score after a stop token, a policy's
        fork or score request) joins one step later than in the synchronous loop. Sampling is
        seeded per sample and position, so a sample draws the synchronous loop's tokens; its
        scores and logprobs are the same bit for bit where its batches are, else to rounding
        (as with any change of arrival time), which may flip a choice between exactly tied
        samples, and a pruned sample may be cut a token later or earlier. A failure while
        launching ahead undoes the step and runs it again without."""
        changed = self.scheduler.changed
        changed.clear()
        flight = self._flight
        if flight is not None and all(s.status is _FINISHED for s in flight.out.seqs):
            flight = self._flight = None  # every sample it ran ahead for has ended (and freed its blocks)
        if flight is None:
            with phase("schedule"):
                out = self.scheduler.schedule(layout=False)
            with phase("prepare"):
                self.scheduler.layout(out)
            if not out.seqs:
                if self.scheduler.has_work() and not probe and not out.cached_scores:
                    raise RuntimeError("the scheduler could not place any sequence: KV cache too small")
                for request in changed:  # samples that ended while scheduling (a cached end score)
                    touched[request.request_id] = request
                return
            flight = self._launch(out, phase, probe=probe)
        ahead = None
        if not probe and self.async_scheduling and not self._ahead_pause and self._can_run_ahead(flight.out):
            try:
                ahead = self._launch_ahead(flight, phase)
            except Exception as e:  # e.g. a request whose next position fails: found synchronously
                raise _AheadFailed(e) from e
        if not probe:
            self._ahead_pause = max(0, self._ahead_pause - 1)
        self._flight = None
        out = self._apply(flight, phase)
        if probe:
            raise _ProbeDone
        # In the step's order; samples forked in it belong to a root's request in it.
        if every:
            for seq in out.seqs:
                touched[seq.request.request_id] = seq.request
            for request in changed:  # a sample the scheduler ended without a row (a cached end score)
                touched.setdefault(request.request_id, request)
        elif changed:
            for seq in out.seqs:
                if seq.request in changed:
                    touched[seq.request.request_id] = seq.request
            for request in changed:
                touched.setdefault(request.request_id, request)
        self._flight = ahead

    def _launch(self, out: SchedulerOutput, phase, probe: bool = False, token_ids=None) -> _Flight:
        """Run the model over a laid-out step and start sampling it; nothing waits for the device
        except a step's self-evaluation scores."""
        prof = self.profiler
        start = time.perf_counter()
        logits = self.runner.execute(out.step, phase) if token_ids is None else \
            self.runner.execute(out.step, phase, token_ids=token_ids)
        if prof is not None and not probe:
            prof.record(out, time.perf_counter() - start)
        num_sample = len(out.sample_seqs)
        scores = []
        if out.score_seqs:
            with phase("score"):
                scores = score_from_logits(logits[num_sample:], self.spec).tolist()
        drawn = self._sample(out, logits[:num_sample], phase) if num_sample else None
        return _Flight(out, drawn, scores)

    def _apply(self, flight: _Flight, phase) -> SchedulerOutput:
        """Take a launched step's tokens back and update the sequences; a step launched ahead
        first drops the rows of samples that no longer decode (returns the step as applied)."""
        out, drawn = flight.out, flight.drawn
        keep = None
        if flight.expect is not None:
            keep = [i for i, (seq, n) in enumerate(zip(out.seqs, flight.expect))
                    if seq.status is _RUNNING and seq.finish_reason is None and not seq.pending_score
                    and len(seq.token_ids) == n]
            if len(keep) < len(out.seqs):
                self.ahead_rows_discarded += len(out.seqs) - len(keep)
                kept = set(keep)
                self._cut_back([s for i, s in enumerate(out.seqs) if i not in kept])
                out = _decode_output(out.step, [out.seqs[i] for i in keep])
        tokens, logprobs = drawn.resolve(out.sample_seqs, keep, phase) if drawn is not None else ([], [])
        with phase("update"):
            self.scheduler.update_from_output(out, tokens, logprobs, flight.scores)
        return out

    def _can_run_ahead(self, out: SchedulerOutput) -> bool:
        """Whether the step after `out` (not yet applied) is the same plain decode step, one
        token further, for every outcome of out's tokens that the host cannot know yet: every
        running sequence with work is one of out's samples, none ends by length or reaches a
        score checkpoint with its next token, nothing that waits could be admitted now (a slot a
        sample frees in this step is filled a step later) and the blocks fit.
        A stop token or string is found only when applied: that row is discarded then."""
        seqs, sched = out.seqs, self.scheduler
        if out.decodes != len(seqs) or out.score_seqs or not seqs or sched.only is not None:
            return False
        if sched.waiting and len(sched.running) - sched.running_roots() < sched.max_num_seqs:
            return False  # there is room to admit it now: the synchronous step does
        max_len = self.max_model_len
        for seq in seqs:
            if seq.status is not _RUNNING or seq.finish_reason is not None or seq.pending_score:
                return False
            request = seq.request
            length = len(seq.token_ids) + 1  # after out's token
            generated = length - request.num_prompt
            if (generated >= request.params.max_tokens or length >= max_len or generated in request.score_at
                    or request.pending_forks):
                return False
        if len(sched.running) != len(seqs):  # others (a root, a sample just forked) must be idle
            ids = {seq.seq_id for seq in seqs}
            if any(s.seq_id not in ids and s.num_computed < len(s.token_ids) for s in sched.running):
                return False
        bm = self.block_manager
        return bm.blocks_needed_many([s.seq_id for s in seqs], 1) <= bm.num_free_blocks

    def _launch_ahead(self, flight: _Flight, phase) -> _Flight:
        """Lay out and launch the decode step after `flight`, its input tokens `flight`'s sampled
        ones on the device; rows are flight's samples in order."""
        seqs = flight.out.sample_seqs
        with phase("prepare"):
            step = prepare_decode(self.block_manager, [s.seq_id for s in seqs], [0] * len(seqs))
            out = _decode_output(step, list(seqs))
        ahead = self._launch(out, phase, token_ids=flight.drawn.tokens)
        ahead.expect = [len(s.token_ids) + 1 for s in seqs]
        self.ahead_steps += 1
        return ahead

    def _cut_back(self, seqs) -> None:
        """Samples whose row of a step launched ahead is discarded: their cache forgets it."""
        bm = self.block_manager
        for seq in seqs:
            if seq.seq_id in bm and bm.length(seq.seq_id) > seq.num_computed:
                bm.truncate(seq.seq_id, seq.num_computed)

    def _cancel_flight(self) -> None:
        """Forget a step launched ahead and not applied (after an undone step): its samples'
        caches are cut back to what they computed, and the next step computes it again."""
        flight, self._flight = self._flight, None
        if flight is not None:
            self._cut_back(flight.out.seqs)

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor, phase=_no_phase) -> _Drawn:
        """Sampling math under phase "sample"; the host's per-sequence work under "sample_prep".
        Returns the draws still on the device (_Drawn.resolve brings them back)."""
        seqs, dev = out.sample_seqs, logits.device
        with phase("sample_prep"):
            cols = self._columns
            if cols is None or cols.seqs != seqs:
                cols = self._columns = _SampleColumns(seqs, dev)
            # Each sample's generated tokens: its sampled row is its last token's.
            last = out.step.positions[out.step.logit_rows[:len(seqs)]]
            steps = torch.from_numpy(last + 1 - cols.num_prompt).to(dev, non_blocking=True)  # no stream wait
        with phase("sample"):
            conf = alt = None
            if cols.confident:
                conf = token_confidence(logits[cols.confident_rows])
            if cols.alternatives:  # the most likely tokens under the untempered model, as the logprobs
                k = min(max(seqs[i].request.params.logprobs for i in cols.alternatives), logits.shape[-1])
                rows = logits[cols.alternative_rows].float().log_softmax(dim=-1)
                alt = rows.topk(k, dim=-1)
            tokens, logprobs = kernels.sample(logits, cols.temperature, cols.top_k, cols.top_p, cols.seeds,
                                              steps, cols.greedy)
            return _Drawn(tokens, logprobs, cols, conf, alt)

    def _fail(self, request: Request, error: str) -> None:
        """End a request with finish reason "error" and free its blocks; others go on. Samples
        it asked for and never drew are reported too, so a failed n-sample request has n."""
        request.error = error
        for temperature in request.pending_forks or ([] if request.samples else [request.params.temperature]):
            seq = self._new_sample(request, request.prompt_ids, len(request.samples), request.seed)
            seq.temperature, seq.status = temperature, SeqStatus.FINISHED
        request.pending_forks.clear()
        for seq in request.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self.scheduler.release(seq)
            if seq.generating or seq.pending_score:
                seq.finish_reason, seq.pending_score = "error", False
        if request.policy is not None:
            request.policy.done = True



def _namespace(adapter: str | None) -> int:
    """Prefix-cache namespace: cached blocks are shared only under the same adapter."""
    if adapter is None:
        return 0
    return int.from_bytes(hashlib.blake2b(str(adapter).encode(), digest_size=8).digest(), "little")


def _decode_output(step, seqs: list[Sequence]) -> SchedulerOutput:
    """A plain decode step's SchedulerOutput: one token per sample, every row sampled."""
    n = len(seqs)
    return SchedulerOutput(step=step, seqs=seqs, num_real=[1] * n, suffixes=[()] * n, sample_seqs=seqs,
                           decodes=n)


class _SampleColumns:
    """A batch's per-sample sampling columns. Each depends only on its sample (temperature, seed
    and params are fixed once it samples), so consecutive steps over the same samples share them."""

    def __init__(self, seqs: list[Sequence], dev: torch.device):
        self.seqs = list(seqs)
        params = [s.request.params for s in seqs]

        def column(values, dtype):  # staged and copied without waiting for the device's stream
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)
        temperatures = [s.temperature for s in seqs]
        self.temperature = column(temperatures, torch.float32)
        # every row greedy, compared in float32 as kernels.sampling compares the column
        self.greedy = bool(np.all(np.array(temperatures, dtype=np.float32) < np.float32(GREEDY_BELOW)))
        self.top_k = column([p.top_k for p in params], torch.int64)
        self.top_p = column([p.top_p for p in params], torch.float32)
        self.seeds = column([s.seed for s in seqs], torch.int64)
        self.num_prompt = np.array([s.request.num_prompt for s in seqs], dtype=np.int64)
        self.confident = [i for i, s in enumerate(seqs) if s.request.track_confidence]
        self.alternatives = [i for i, p in enumerate(params) if p.logprobs]
        self.confident_rows = column(self.confident, torch.int64)
        self.alternative_rows = column(self.alternatives, torch.int64)


class _Drawn:
    """One step's draws on the device: the tokens (also the next step's input when it runs
    ahead), their logprobs, and any confidences and top logprobs. On CUDA the copies to the
    host start at once, so bringing them back waits for this step only."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor, cols: _SampleColumns,
                 conf: torch.Tensor | None, alt: tuple[torch.Tensor, torch.Tensor] | None):
        self.tokens, self.cols = tokens, cols
        device_values = [tokens, logprobs] + ([conf] if conf is not None else []) + (list(alt) if alt else [])
        self.event = None
        if tokens.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device_values]
            for h, t in zip(host, device_values):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tokens.device))  # the copies' stream
            device_values = host
        self.values = device_values
        self.has_conf, self.has_alt = conf is not None, alt is not None

    def resolve(self, seqs: list[Sequence], keep: list[int] | None, phase=_no_phase,
                ) -> tuple[list[int], list[float]]:
        """(tokens, logprobs) of the rows kept (None: all), in order; appends the kept rows'
        confidences and top logprobs to seqs (the kept samples)."""
        with phase("sample"):
            if self.event is not None:
                self.event.synchronize()
            tokens, logprobs = self.values[0].tolist(), self.values[1].tolist()
            rest = self.values[2:]
            conf = rest.pop(0).tolist() if self.has_conf else None
            alt = (rest[0].tolist(), rest[1].tolist()) if self.has_alt else None
        if keep is not None:
            tokens, logprobs = [tokens[i] for i in keep], [logprobs[i] for i in keep]
        row = {i: k for k, i in enumerate(keep)} if keep is not None else None
        cols = self.cols
        if conf is not None:
            for j, i in enumerate(cols.confident):
                k = i if row is None else row.get(i)
                if k is not None:
                    seqs[k].confidences.append(conf[j])
        if alt is not None:
            for j, i in enumerate(cols.alternatives):
                k = i if row is None else row.get(i)
                if k is not None:
                    n = seqs[k].request.params.logprobs
                    seqs[k].top_logprobs.append(list(zip(alt[1][j], alt[0][j]))[:n])
        return tokens, logprobs


class _Flight:
    """A launched step: its schedule, draws and scores. expect: for a step launched ahead,
    each row's sequence length once the step before it is applied (a row whose sample differs
    then is discarded)."""

    def __init__(self, out: SchedulerOutput, drawn: _Drawn | None, scores: list):
        self.out, self.drawn, self.scores = out, drawn, scores
        self.expect: list[int] | None = None


class _HeldInterrupt:
    """Ctrl-C during a step. Inside the transaction's body it raises at once (the step is undone,
    as by any exception there); anywhere else in the step (committing, the policies' and text
    bookkeeping, building the deltas) a KeyboardInterrupt landing between two statements could
    leave half a token's text, a request that never ends or a leaked block, so it is held back and
    raised by release() at the end of the output phase, whose handler keeps every delta built for
    the next step. One that comes after release() is raised by the next step() before it does
    anything. What is left: once step() has put Python's handler back (its last statements), a
    Ctrl-C raises there and the step's deltas never reach the caller. Only in the main thread
    (signals reach no other) and over Python's own SIGINT handler (one a caller installed stays
    in place)."""

    __slots__ = ("previous", "received", "live")

    def __init__(self):
        self.previous, self.received, self.live = None, False, False
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if handler is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._hold)
                self.previous = handler

    def _hold(self, signum, frame) -> None:
        if self.live:
            raise KeyboardInterrupt
        self.received = True

    def release(self) -> None:
        """Raise the Ctrl-C held back so far, if one came."""
        if self.received:
            self.received = False
            raise KeyboardInterrupt

    def restore(self) -> bool:
        """Put Python's handler back; whether a Ctrl-C came that was not raised."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
        received, self.received = self.received, False
        return received


class _AheadFailed(Exception):
    """Launching the step after this one raised: the step is undone and run again without it
    (the error belongs to the next step; run synchronously, that step finds its culprit)."""


class _ProbeDone(Exception):
    """A probe step got through: undo it (it only tells whether the step fails)."""
