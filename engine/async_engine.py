"""AsyncEngine: the engine for asyncio servers. A dedicated thread runs the step loop; callers
stream each request's deltas with `async for`, and may add or abort requests at any step.

Why a thread and not a process: the model, its KV cache and the step loop stay in this process,
so nothing is pickled or copied between processes per step; torch releases the GIL inside its
kernels, so the event loop keeps serving while a step runs. What the thread costs is one
`call_soon_threadsafe` wake-up per event loop per step, and the consumers' coroutine switches,
which compete with the step for the CPU. bench/async_overhead.py measures it against
Engine.generate on the same work: on 2 CPU cores with the toy model (steps of ~5 ms), 64 requests
x 32 tokens took 1.1-1.9x as long through AsyncEngine (the same 33 steps; one hand-off 6-15 us).

    engine = AsyncEngine(Engine(model_dir))
    async for delta in engine.generate(prompt, SamplingParams(max_tokens=32)):
        ...                             # delta.samples: new tokens/text per sample; .finished
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.api import Engine, Prompt
from engine.errors import EngineError, InvalidRequestError
from engine.policies.base import Policy
from engine.sampling import RequestDelta, SamplingParams


class EngineDeadError(EngineError):
    """The step loop is not running (shut down, or a step failed for every request)."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    engine_id: int | None = None
    done: bool = False


@dataclass
class _Stats:
    steps: int = 0
    step_seconds: float = 0.0
    tokens_generated: int = 0
    score_calls: int = 0
    samples_pruned: int = 0
    requests_finished: int = 0
    requests_failed: int = 0


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._adds: list[tuple[str, list[int], SamplingParams, Policy | None]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._by_engine_id: dict[int, str] = {}
        self._ids = itertools.count()
        self._stats = _Stats()
        self._stopped = False
        self._failures = 0  # consecutive failed steps
        self._batch: dict | None = None  # a step's deliveries, by event loop
        self._thread = threading.Thread(target=self._run, name="selfeval-engine-loop", daemon=True)
        self._thread.start()

    # ---- the caller's side ------------------------------------------------------------------
    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       policy: Policy | None = None, request_id: str | None = None,
                       ) -> AsyncIterator[RequestDelta]:
        """Stream one request's deltas; the last has finished=True and the full output. A consumer
        slower than the steps gets the steps it missed merged into one delta. Bad
        input raises InvalidRequestError before anything is queued. Cancelling the consumer (or
        leaving the loop early) aborts the request and frees its blocks."""
        params = params or SamplingParams()
        ids = self.engine.tokenize(prompt)
        self.engine.validate(ids, params, policy)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop())
        with self._cond:
            if self._stopped:
                raise EngineDeadError("the engine is shut down")
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
            self._adds.append((request_id, ids, params, policy))
            self._cond.notify()
        try:
            while True:
                item = await stream.queue.get()
                while not isinstance(item, BaseException) and not stream.queue.empty():
                    later = stream.queue.get_nowait()  # fell behind: the steps missed, as one
                    item = later if isinstance(later, BaseException) else item.merge(later)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.done:  # the consumer left early, was cancelled, or failed
                self._abort_now(request_id)

    async def score(self, prompts: list[Prompt], responses: list[Prompt]) -> list[float]:
        """Self-evaluation scores of (prompt, response) pairs, batched with running requests."""
        if len(prompts) != len(responses):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(responses)} responses")
        joined = [self.engine.tokenize(p) + (self.engine.tokenizer.encode(r, add_special_tokens=False)
                                             if isinstance(r, str) else self.engine.tokenize(r))
                  for p, r in zip(prompts, responses)]

        async def one(ids):
            async for delta in self.generate(ids, SamplingParams(max_tokens=0, score=True)):
                if delta.finished:
                    return delta.output.samples[0].score

        return list(await asyncio.gather(*(one(ids) for ids in joined)))

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is None or stream.done:
                return
            stream.done = True
            self._aborts.append(request_id)
            self._cond.notify()

    def stats(self) -> dict:
        """Counters for /metrics: requests running and waiting, KV blocks, tokens, time per step."""
        s, eng = self._stats, self.engine
        bm, scheduler = eng.block_manager, eng.core.scheduler
        live = {"kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
                "kv_blocks_cached": bm.num_cached_blocks,
                "requests_running": len({q.request.request_id for q in list(scheduler.running)}),
                "requests_waiting": len({q.request.request_id for q in list(scheduler.waiting)})}
        return {**live, "steps": s.steps, "step_seconds_total": s.step_seconds,
                "tokens_generated": s.tokens_generated, "score_calls": s.score_calls,
                "samples_pruned": s.samples_pruned, "requests_finished": s.requests_finished,
                "requests_failed": s.requests_failed, "requests_in_flight": len(self._streams)}

    def shutdown(self) -> None:
        """Stop the loop (requests still streaming get EngineDeadError) and join the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ---------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not (self._stopped or self._adds or self._aborts or eng.has_unfinished_requests()):
                    self._cond.wait()  # idle: no spinning
                if self._stopped:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for request_id, ids, params, policy in adds:
                stream = self._streams.get(request_id)
                if stream is None or stream.done:
                    continue
                try:
                    stream.engine_id = eng.add_request(ids, params, policy)
                    self._by_engine_id[stream.engine_id] = request_id
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    self._finish(request_id, e)
            for request_id in aborts:
                stream = self._streams.pop(request_id, None)
                if stream is not None and stream.engine_id is not None:
                    eng.abort(stream.engine_id)
                    self._by_engine_id.pop(stream.engine_id, None)
            if eng.has_unfinished_requests():
                self._step()
        self._fail_all(EngineDeadError("the engine is shut down"))

    def _step(self) -> None:
        eng = self.engine
        start = time.perf_counter()
        try:
            deltas = eng.step_deltas()
        except Exception as e:  # noqa: BLE001 - undone by the core, and no one request causes it
            self._failures += 1
            if self._failures >= 2:  # not a one-off: end what is in flight rather than spin
                self._failures = 0
                self._fail_all(EngineError(f"a step failed twice running and was undone: {e!r}"),
                               abort=True)
            return
        self._failures = 0
        s = self._stats
        s.steps += 1
        s.step_seconds += time.perf_counter() - start
        self._batch = {}
        for delta in deltas:
            request_id = self._by_engine_id.get(delta.request_id)
            if request_id is None:
                continue
            if delta.finished:
                self._by_engine_id.pop(delta.request_id, None)
                st = delta.output.stats
                s.tokens_generated += st.generated_tokens
                s.score_calls += st.score_calls
                s.samples_pruned += st.samples_pruned
                s.requests_finished += 1
                s.requests_failed += delta.output.error is not None
                self._finish(request_id, delta)
            else:
                self._send(request_id, delta)
        batch, self._batch = self._batch, None
        for loop, items in batch.items():  # one wake-up per event loop per step, not per request
            loop.call_soon_threadsafe(_deliver, items)

    def _send(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._post(stream, item)

    def _post(self, stream: _Stream, item) -> None:
        if self._batch is not None:
            self._batch.setdefault(stream.loop, []).append((stream.queue, item))
        else:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _finish(self, request_id: str, item) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            stream.done = True
        self._post(stream, item)

    def _fail_all(self, error: BaseException, abort: bool = False) -> None:
        for request_id in list(self._streams):
            stream = self._streams.get(request_id)
            if abort and stream is not None and stream.engine_id is not None:
                self.engine.abort(stream.engine_id)
                self._by_engine_id.pop(stream.engine_id, None)
            self._finish(request_id, error)


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
