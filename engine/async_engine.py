"""AsyncEngine: the engine for asyncio servers. A step loop runs beside the event loop; callers
stream each request's deltas with `async for`, and may add or abort requests at any step.

Where the step loop runs:
- `AsyncEngine.start(config)` (what `selfeval serve` uses): in a child process of its own, as
  vLLM V1 runs its EngineCore. Requests go to it and each step's deltas come back over pipes
  (pickled: ~20 bytes a token); a reader thread hands them to the event loops. As in vLLM, text
  is decoded on this side: a request without stop strings runs there with detokenize=False, and
  each sample's one-token delta crosses as a row (TokenDeltas), which took the engine process's
  host time per step at batch 256 from 2.3-3.1 to 1.2-1.5 ms (bench/host_overhead.py,
  b256+process against b256+process-objects, three runs). The child holds
  the model, KV cache and scheduler, so the server's Python (HTTP, JSON, SSE) never takes the GIL
  from a step: a pure-Python thread busy 30% of the time slowed the engine's steps by 17-21% from
  inside its process and by 2% from another (2 CPU cores, toy model). Under bench/serve_load.py
  (1,000 requests, 64 in flight) the server gave 4,592 tok/s this way and 4,154 tok/s with the
  loop in a thread; starting the process takes a few seconds (it imports torch and loads the model).
- `AsyncEngine(engine)`: in a thread of this process, on an Engine the caller built (tests,
  notebooks, embedding without a second process). Nothing is pickled; the event loop and the
  step compete for the GIL (torch releases it inside kernels only).

Either way a step's deltas reach each event loop in one wake-up, a consumer that fell behind
gets the steps it missed merged into one delta, and the loop sleeps when idle.

    engine = AsyncEngine.start(EngineConfig(model=model_dir))
    async for delta in engine.generate(prompt, SamplingParams(max_tokens=32)):
        ...                             # delta.samples: new tokens/text per sample; .finished
    engine.shutdown()
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import multiprocessing
import multiprocessing.connection
import pickle
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from engine.api import Engine
from engine.config import EngineConfig
from engine.detokenizer import BytePieces, IncrementalDetokenizer
from engine.errors import EngineError, InvalidRequestError, WorkerError
from engine.inputs import InputProcessor, Limits, Prompt
from engine.policies.base import Policy
from engine.sampling import RequestDelta, SamplingParams, TokenDeltas


class EngineDeadError(EngineError):
    """The step loop is not running (shut down, its process exited, or it failed to start)."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    key: int
    name: str = ""
    done: bool = False


@dataclass
class _Stats:
    steps: int = 0
    step_seconds: float = 0.0
    tokens_generated: int = 0
    score_calls: int = 0
    scores_cached: int = 0
    samples_pruned: int = 0
    requests_finished: int = 0
    requests_failed: int = 0


# Messages to the step loop: ("add", key, payload), ("abort", key), ("stop",), where key is an
# int this AsyncEngine never reuses (a caller's request id may come back while the loop still
# holds the old request's last step) and payload is (ids, params, policy), pickled on its own to
# the engine process so that one that cannot be rebuilt there fails that request only. Back
# from the loop, per step: (events, step_seconds or None, live stats or None), where an event is
# (key, RequestDelta or the exception that ended the request), or (None, (keys, TokenDeltas)): the
# step's one-token deltas as rows, and the key of each row.
_LIVE_EVERY = 0.05  # seconds between live stats while busy (they walk the queues); always when idle


def _live_stats(eng: Engine) -> dict:
    bm, scheduler = eng.block_manager, eng.core.scheduler
    return {"kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "requests_running": len({q.request.request_id for q in scheduler.running}),
            "requests_waiting": len({q.request.request_id for q in scheduler.waiting}),
            "steps_ran_ahead": eng.core.ahead_steps}


def _core_loop(eng: Engine, receive: Callable[[bool], list], emit: Callable[[list, float | None, dict], None],
               rows: bool = False) -> None:
    """Take messages, step while anything is unfinished, emit each step's events. `receive(True)`
    blocks until a message comes (the loop is idle); `receive(False)` takes what is there. rows:
    the one-token deltas go as TokenDeltas rows (cheap to pickle: the engine process's loop)."""
    ids: dict[int, int] = {}  # AsyncEngine's key -> engine's request id
    names: dict[int, int] = {}
    failures = 0  # consecutive failed steps
    live_at = 0.0
    while True:
        events: list = []
        messages = receive(not eng.has_unfinished_requests())
        for message in messages:
            if message[0] == "stop":
                return
            if message[0] == "add":
                _, rid, payload = message
                try:
                    if isinstance(payload, bytes):
                        try:
                            payload = pickle.loads(payload)
                        except Exception as e:  # noqa: BLE001 - e.g. a policy class this process lacks
                            raise InvalidRequestError(f"the request could not be rebuilt in the engine "
                                                      f"process: {type(e).__name__}: {e}") from None
                    ids[rid] = eng.add_request(*payload)
                    names[ids[rid]] = rid
                except Exception as e:  # noqa: BLE001 - the caller gets it (as a picklable error)
                    events.append((rid, e if type(e) in (InvalidRequestError, EngineError)
                                   else EngineError(f"{type(e).__name__}: {e}")))
            elif message[0] == "abort" and message[1] in ids:
                eng.abort(ids[message[1]])
                names.pop(ids.pop(message[1]), None)
        step_seconds = None
        if eng.has_unfinished_requests():
            start = time.perf_counter()
            try:
                deltas, tokens = eng.step_token_deltas() if rows else (eng.step_deltas(), None)
            except WorkerError as e:  # no step can run any more: end everything, then stop
                emit(events + [(rid, e) for rid in ids], None, None)
                raise
            except Exception as e:  # noqa: BLE001 - undone by the core, and no one request causes it
                deltas, tokens, failures = [], None, failures + 1
                if failures >= 2:  # not a one-off: end what is in flight rather than spin
                    failures = 0
                    error = EngineError(f"a step failed twice running and was undone: {e!r}")
                    for rid, eid in ids.items():
                        eng.abort(eid)
                        events.append((rid, error))
                    ids.clear()
                    names.clear()
            else:
                failures, step_seconds = 0, time.perf_counter() - start
            for delta in deltas:
                rid = names.get(delta.request_id)
                if rid is None:
                    continue
                if delta.finished:
                    del names[delta.request_id], ids[rid]
                events.append((rid, delta))
            if tokens:  # as rows: the process's pipe takes them in a few percent of the deltas' time
                events.append((None, ([names.get(row[0]) for row in tokens.rows], tokens)))
        if events or messages or step_seconds is not None:
            now = time.perf_counter()
            live = None
            if now - live_at >= _LIVE_EVERY or not eng.has_unfinished_requests():
                live, live_at = _live_stats(eng), now
            emit(events, step_seconds, live)


def _child_main(config: EngineConfig, inbox, outbox) -> None:
    """The engine process: build the engine, say it is ready, run the loop until told to stop or
    the parent goes (its end of the pipe closes)."""
    try:
        eng = Engine(config)
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        outbox.send(("failed", f"{type(e).__name__}: {e}"))
        return
    limits = eng.inputs.limits
    # This process is the engine's: what was built so far lives as long as it does, and frozen
    # out of the cyclic collector a full collection no longer walks it (one took 231 ms, a
    # stall every few hundred steps at batch 256; bench/host_overhead.py).
    gc.collect()
    gc.freeze()
    outbox.send(("ready", limits, _live_stats(eng)))

    def receive(block: bool) -> list:
        messages = [inbox.recv()] if block else []
        while inbox.poll():
            messages.append(inbox.recv())
        return messages

    def emit(events: list, step_seconds: float | None, live: dict | None) -> None:
        try:
            blob = pickle.dumps((events, step_seconds, live))
        except Exception:  # noqa: BLE001 - an output that cannot cross: fail its request alone
            events = [(rid, _sendable(item)) for rid, item in events]
            blob = pickle.dumps((events, step_seconds, live))
        outbox.send_bytes(blob)

    try:
        _core_loop(eng, receive, emit, rows=True)
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        eng.shutdown()


def _sendable(item):
    try:
        pickle.dumps(item)
        return item
    except Exception as e:  # noqa: BLE001
        return EngineError(f"the engine's output could not be sent to this process: {type(e).__name__}: {e}")


class AsyncEngine:
    def __init__(self, engine: Engine):
        """Run the step loop in a thread of this process, on `engine` (see the module doc)."""
        self.engine = engine
        self._setup(engine.inputs, _live_stats(engine))
        self._inbox: list = []
        self._thread = threading.Thread(target=self._run_thread, name="selfeval-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, config: EngineConfig | str, **settings) -> AsyncEngine:
        """Build the engine in a child process of its own and run the step loop there. Returns
        once the engine is ready; an engine that fails to build raises here."""
        from engine.model.loader import load_tokenizer

        config = config if isinstance(config, EngineConfig) else EngineConfig(model=str(config), **settings)
        self = cls.__new__(cls)
        self.engine = None
        ctx = multiprocessing.get_context("spawn")  # no forked CUDA or thread state
        to_child, self._to_child = ctx.Pipe(duplex=False)
        self._from_child, from_child = ctx.Pipe(duplex=False)
        # Not a daemon: it may start processes of its own (tensor-parallel ranks). It still ends
        # with this process: shutdown() at exit, and EOF on its pipe if this process is killed.
        self._process = ctx.Process(target=_child_main, args=(config, to_child, from_child),
                                    name="selfeval-engine", daemon=False)
        self._process.start()
        to_child.close()
        from_child.close()
        while not self._from_child.poll(0.1):
            if not self._process.is_alive():
                raise EngineDeadError(f"the engine process exited with code {self._process.exitcode} "
                                      f"before it was ready")
        message = self._from_child.recv()
        if message[0] == "failed":
            self._process.join()
            raise EngineDeadError(f"the engine process could not build the engine: {message[1]}")
        self._setup(InputProcessor(load_tokenizer(config.model), message[1]), message[2])
        # Sends go through a thread of their own: a pipe whose buffer is full (the child is in a
        # long step) blocks the sender, and that must not be the event loop.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._run_sender, name="selfeval-engine-sender", daemon=True)
        self._sender.start()
        self._thread = threading.Thread(target=self._run_reader, name="selfeval-engine-reader", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)
        return self

    def _setup(self, inputs: InputProcessor, live: dict) -> None:
        self.inputs, self.tokenizer = inputs, inputs.tokenizer
        self._pieces = BytePieces.of(self.tokenizer)
        self.limits: Limits = inputs.limits
        self.max_model_len = self.limits.max_model_len
        self._cond = threading.Condition()
        self._streams: dict[int, _Stream] = {}  # by key (see the message comment above)
        self._names: dict[str, int] = {}  # caller's request id -> key, while it runs
        self._keys = itertools.count()
        self._stats, self._live = _Stats(), live
        self._stopped = False

    def _pop(self, key: int) -> _Stream | None:
        """Forget a stream (caller holds self._cond)."""
        stream = self._streams.pop(key, None)
        if stream is not None and self._names.get(stream.name) == key:
            del self._names[stream.name]
        return stream

    # ---- the caller's side ------------------------------------------------------------------
    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       policy: Policy | None = None, request_id: str | None = None,
                       ) -> AsyncIterator[RequestDelta]:
        """Stream one request's deltas; the last has finished=True and the full output. A consumer
        slower than the steps gets the steps it missed merged into one delta. Bad input raises
        InvalidRequestError before anything is queued. Cancelling the consumer (or leaving the
        loop early) aborts the request and frees its blocks."""
        params = params or SamplingParams()
        ids = self.inputs.tokenize(prompt)
        self.inputs.validate(ids, params, policy)
        texts = None
        if self.engine is None and params.detokenize and not params.stop:
            # Text is decoded here, off the engine process's step loop (as vLLM's front end does);
            # stop strings need it there, where they end a sample.
            texts = _Texts(self.tokenizer, ids, self._pieces)
            params = replace(params, detokenize=False)
        payload = (ids, params, policy)
        if self.engine is None:  # pickled here: what cannot be sent fails now, in the caller
            try:
                payload = pickle.dumps(payload)
            except Exception as e:  # noqa: BLE001
                raise InvalidRequestError(f"the request cannot be sent to the engine process: "
                                          f"{type(e).__name__}: {e}") from e
        key = next(self._keys)
        request_id = request_id if request_id is not None else f"req-{key}"
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), key)
        with self._cond:
            if self._stopped:
                raise EngineDeadError("the engine is shut down")
            if request_id in self._names:
                raise InvalidRequestError(f"request id {request_id!r} is already running")
            self._streams[key], self._names[request_id] = stream, key
            stream.name = request_id
        self._submit(("add", key, payload))
        try:
            while True:
                item = await stream.queue.get()
                while not isinstance(item, BaseException) and not stream.queue.empty():
                    later = stream.queue.get_nowait()  # fell behind: the steps missed, as one
                    item = later if isinstance(later, BaseException) else item.merge(later)
                if isinstance(item, BaseException):
                    raise item
                if texts is not None:
                    texts.fill(item)
                yield item
                if item.finished:
                    return
        finally:
            if not stream.done:  # the consumer left early, was cancelled, or failed
                self._abort_now(key)

    async def score(self, prompts: list[Prompt], responses: list[Prompt]) -> list[float]:
        """Self-evaluation scores of (prompt, response) pairs, batched with running requests."""
        if len(prompts) != len(responses):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(responses)} responses")
        joined = [self.inputs.tokenize(p) + (self.tokenizer.encode(r, add_special_tokens=False)
                                             if isinstance(r, str) else self.inputs.tokenize(r))
                  for p, r in zip(prompts, responses)]

        async def one(ids):
            async for delta in self.generate(ids, SamplingParams(max_tokens=0, score=True)):
                if delta.finished:
                    return delta.output.samples[0].score

        return list(await asyncio.gather(*(one(ids) for ids in joined)))

    async def abort(self, request_id: str) -> None:
        with self._cond:
            key = self._names.get(request_id)
        if key is not None:
            self._abort_now(key)

    def _abort_now(self, key: int) -> None:
        with self._cond:
            stream = self._pop(key)
            if stream is None or stream.done:
                return
            stream.done = True
        self._submit(("abort", key))
        try:  # a consumer still waiting (aborted from elsewhere) ends rather than hangs
            error = EngineError(f"request {stream.name!r} was aborted")
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        except RuntimeError:
            pass

    def stats(self) -> dict:
        """Counters for /metrics: requests running and waiting, KV blocks, tokens, time per step."""
        s = self._stats
        return {**self._live, "steps": s.steps, "step_seconds_total": s.step_seconds,
                "tokens_generated": s.tokens_generated, "score_calls": s.score_calls,
                "scores_cached": s.scores_cached,
                "samples_pruned": s.samples_pruned, "requests_finished": s.requests_finished,
                "requests_failed": s.requests_failed, "requests_in_flight": len(self._streams)}

    def shutdown(self) -> None:
        """Stop the loop (requests still streaming get EngineDeadError); join its thread, and its
        process if it has one."""
        with self._cond:
            already, self._stopped = self._stopped, True
        if not already:
            self._submit(("stop",))
        if self.engine is None:
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._outbox.put(None)
            self._sender.join()
            self._to_child.close()
        self._thread.join()
        self._fail_all(EngineDeadError("the engine is shut down"))

    @property
    def is_running(self) -> bool:
        with self._cond:
            if self._stopped:
                return False
        return self._thread.is_alive() and (self.engine is not None or self._process.is_alive())

    # ---- between the caller and the loop ----------------------------------------------------
    def _submit(self, message: tuple) -> None:
        if self.engine is not None:
            with self._cond:
                self._inbox.append(message)
                self._cond.notify()
            return
        self._outbox.put(message)

    def _run_sender(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._to_child.send(message)
            except (OSError, ValueError):  # the process is gone: the reader fails every stream
                return

    def _run_thread(self) -> None:
        def receive(block: bool) -> list:
            with self._cond:
                while block and not self._inbox:
                    self._cond.wait()  # idle: no spinning
                messages, self._inbox = self._inbox, []
            return messages

        error = EngineDeadError("the engine is shut down")
        try:
            _core_loop(self.engine, receive, self._on_events)
        except BaseException as e:  # noqa: BLE001 - whatever broke the loop, no caller may hang on it
            error = EngineDeadError(f"the engine loop stopped: {type(e).__name__}: {e}")
            raise
        finally:
            with self._cond:
                self._stopped = True
            self._fail_all(error)

    def _run_reader(self) -> None:
        # Wait on the pipe and on the process: a killed process's pipe may stay open in a
        # process it started, so its end is seen by its sentinel, not by EOF alone.
        conn, sentinel = self._from_child, self._process.sentinel
        try:
            while True:
                ready = multiprocessing.connection.wait([conn, sentinel])
                if conn in ready:
                    self._on_events(*pickle.loads(conn.recv_bytes()))
                elif not conn.poll():
                    break
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message that cannot be read: stop, never hang callers
            self._process.kill()
        self._process.join(timeout=5)
        code = self._process.exitcode
        with self._cond:
            self._stopped = True
        self._fail_all(EngineDeadError("the engine is shut down" if code == 0 else
                                       f"the engine process exited (code {code})"))

    def _on_events(self, events: list, step_seconds: float | None, live: dict | None) -> None:
        """Hand a step's events to their streams: one wake-up per event loop."""
        s, batch = self._stats, {}
        if live is not None:
            self._live = live
        if step_seconds is not None:
            s.steps += 1
            s.step_seconds += step_seconds
        for key, item in _expand(events):
            final = isinstance(item, BaseException) or item.finished
            if isinstance(item, RequestDelta) and item.finished:
                st = item.output.stats
                s.tokens_generated += st.generated_tokens
                s.score_calls += st.score_calls
                s.scores_cached += st.cached_scores
                s.samples_pruned += st.samples_pruned
                s.requests_finished += 1
                s.requests_failed += item.output.error is not None
            with self._cond:
                stream = self._pop(key) if final else self._streams.get(key)
                if stream is None:
                    continue
                stream.done = stream.done or final
            batch.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in batch.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: no one is listening
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams, self._streams, self._names = self._streams, {}, {}
        for stream in streams.values():
            stream.done = True
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            except RuntimeError:  # that event loop is closed: no one is listening
                pass


class _Texts:
    """The text of one request's samples, decoded from the tokens its deltas carry (the engine
    process ran it with detokenize=False): each delta's text, and at the end each sample's."""

    def __init__(self, tokenizer, prompt_ids: list[int], pieces: BytePieces | None):
        self.tokenizer, self.prompt_ids, self.pieces = tokenizer, prompt_ids, pieces
        self.samples: dict[int, tuple[IncrementalDetokenizer, list[int]]] = {}  # index -> (text, tokens)

    def _sample(self, index: int) -> tuple[IncrementalDetokenizer, list[int]]:
        got = self.samples.get(index)
        if got is None:
            got = self.samples[index] = (IncrementalDetokenizer(self.tokenizer, self.prompt_ids, (),
                                                                self.pieces), [])
        return got

    def fill(self, delta: RequestDelta) -> None:
        for s in delta.samples:
            det, tokens = self._sample(s.index)
            tokens += s.token_ids
            s.text = det.push(s.token_ids, final=s.finish_reason is not None)
        if delta.output is not None:
            for sample in delta.output.samples:
                det, tokens = self._sample(sample.index)
                if tokens != sample.token_ids:  # not all streamed (deltas lost): decoded whole
                    det = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, (), self.pieces)
                    det.push(sample.token_ids, final=True)
                sample.text = det.text


def _expand(events: list) -> list:
    """A step's events with its TokenDeltas rows joined in (TokenDeltas.merge_into): (key,
    RequestDelta or error) each. Rows whose request has no key (aborted) are dropped."""
    batches = [item for key, item in events if key is None]  # _core_loop sends one a step at most
    if not batches:
        return events
    out = [(key, item) for key, item in events if key is not None]
    for keys, tokens in batches:
        key_of = {row[0]: k for k, row in zip(keys, tokens.rows) if k is not None}  # engine id -> key
        objects = [item for _, item in out if isinstance(item, RequestDelta)]
        joined = TokenDeltas([row for row in tokens.rows if row[0] in key_of]).merge_into(objects)
        out += [(key_of[d.request_id], d) for d in joined[len(objects):]]  # rows of no object's request
    return out


def _deliver(items: list) -> None:
    for stream_queue, item in items:
        stream_queue.put_nowait(item)
