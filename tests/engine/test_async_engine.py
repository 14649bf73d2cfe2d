"""AsyncEngine: concurrent streams give the synchronous engine's outputs; a cancelled or
abandoned consumer aborts its request and frees its blocks; bad input raises at once; a failing
step does not hang anyone; the loop sleeps when idle and stops on shutdown."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from engine import Engine, InvalidRequestError, SamplingParams
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.errors import EngineError
from engine.policies import BestOfN

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20], [30, 31]]


@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
def aeng(llama_dir, request):
    engine = AsyncEngine(Engine(str(llama_dir), block_size=4, num_blocks=128, async_scheduling=request.param))
    yield engine
    engine.shutdown()


async def _collect(aeng, prompt, params=GREEDY, policy=None, request_id=None):
    text, tokens, final = {}, {}, None
    async for delta in aeng.generate(prompt, params, policy, request_id):
        for d in delta.samples:
            text[d.index] = text.get(d.index, "") + d.text
            tokens[d.index] = tokens.get(d.index, []) + d.token_ids
        if delta.finished:
            final = delta.output
    return text, tokens, final


def test_concurrent_streams_match_the_sync_engine(llama_dir, aeng):
    expected = Engine(str(llama_dir), block_size=4, num_blocks=128).generate(PROMPTS, GREEDY)

    async def main():
        return await asyncio.gather(*(_collect(aeng, p) for p in PROMPTS),
                                    _collect(aeng, PROMPTS[0], SamplingParams(max_tokens=6, seed=1),
                                             BestOfN(3)))

    results = asyncio.run(main())
    # Each delta's text and the output's are the sync engine's (AsyncEngine.start decodes it in the
    # caller's process: the engine process runs with detokenize=False).
    for (text, tokens, final), exp in zip(results, expected):
        assert tokens[0] == exp.samples[0].token_ids == final.samples[0].token_ids
        assert text[0] == final.samples[0].text == exp.samples[0].text and text[0]
    text, tokens, final = results[-1]
    assert all(text[s.index] == s.text and tokens[s.index] == s.token_ids for s in final.samples)
    assert len(results[-1][2].samples) == 3 and results[-1][2].best_index is not None
    assert aeng.engine.num_free_blocks == 128
    assert (aeng.engine.core.ahead_steps > 0) == aeng.engine.core.async_scheduling
    stats = aeng.stats()
    assert stats["requests_finished"] == 5 and stats["tokens_generated"] == 4 * 10 + 3 * 6


def test_a_cancelled_consumer_aborts_its_request(aeng):
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        seen = asyncio.Event()

        async def consume():
            async for _ in aeng.generate(PROMPTS[1], long):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async for _ in aeng.generate(PROMPTS[0], long):  # leaving the loop early aborts too
            break
        return await _collect(aeng, PROMPTS[2])  # the engine goes on serving

    text, tokens, final = asyncio.run(main())
    assert len(tokens[0]) == 10
    deadline = time.time() + 5
    while aeng.engine.num_free_blocks != 128 and time.time() < deadline:
        time.sleep(0.01)
    assert aeng.engine.num_free_blocks == 128 and not aeng.engine.has_unfinished_requests()


def test_bad_input_raises_before_queueing(aeng):
    async def main():
        with pytest.raises(InvalidRequestError):
            await _collect(aeng, [10**6])
        with pytest.raises(InvalidRequestError, match="n at 1"):
            await _collect(aeng, PROMPTS[0], SamplingParams(n=2), BestOfN(2))
        return await _collect(aeng, PROMPTS[0])

    assert len(asyncio.run(main())[1][0]) == 10
    assert aeng.stats()["requests_in_flight"] == 0


def test_a_failing_step_ends_in_flight_requests_and_the_engine_serves_on(aeng, monkeypatch):
    real = aeng.engine.core.runner.execute
    broken = {"on": True}

    def execute(*a, **k):
        if broken["on"]:
            raise RuntimeError("device lost")
        return real(*a, **k)

    monkeypatch.setattr(aeng.engine.core.runner, "execute", execute)

    async def main():
        # The core undoes the step and tries each request alone: each fails, so each ends with
        # finish reason "error" (were it one request's fault, only that one would).
        _, _, failed = await asyncio.wait_for(_collect(aeng, PROMPTS[0]), timeout=30)
        broken["on"] = False
        return failed, await asyncio.wait_for(_collect(aeng, PROMPTS[1]), timeout=30)

    failed, (_, tokens, _) = asyncio.run(main())
    assert "device lost" in failed.error and failed.samples[0].finish_reason == "error"
    assert len(tokens[0]) == 10
    assert aeng.engine.num_free_blocks == 128


def test_idle_loop_sleeps_and_shutdown_stops_it(llama_dir):
    aeng = AsyncEngine(Engine(str(llama_dir), block_size=4, num_blocks=64))
    asyncio.run(_collect(aeng, PROMPTS[0]))
    steps = aeng.stats()["steps"]
    time.sleep(0.2)
    assert aeng.stats()["steps"] == steps  # no steps while idle
    aeng.shutdown()
    assert not aeng.is_running

    async def after():
        await _collect(aeng, PROMPTS[0])

    with pytest.raises(EngineDeadError):
        asyncio.run(after())


def test_a_step_that_fails_only_together_ends_those_requests_not_the_engine(aeng, monkeypatch):
    real = aeng.engine.core.runner.execute

    def execute(step, *a, **k):
        if step.num_seqs >= 2:  # no request fails alone, yet together they always do
            raise RuntimeError("out of device memory")
        return real(step, *a, **k)

    monkeypatch.setattr(aeng.engine.core.runner, "execute", execute)

    async def main():
        results = await asyncio.wait_for(asyncio.gather(
            _collect(aeng, PROMPTS[0]), _collect(aeng, PROMPTS[1]), return_exceptions=True), timeout=60)
        return results, await asyncio.wait_for(_collect(aeng, PROMPTS[2]), timeout=30)

    together, (_, alone, _) = asyncio.run(main())
    assert any(isinstance(r, EngineError) and "out of device memory" in str(r) for r in together)
    assert len(alone[0]) == 10  # served on
    assert aeng.engine.num_free_blocks == 128


def test_a_slow_consumer_gets_the_steps_it_missed_merged(aeng):
    """Deltas queued while the consumer was busy arrive as one: same tokens, text, logprobs."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)

    async def main():
        deltas = []
        async for delta in aeng.generate(PROMPTS[1], params):
            deltas.append(delta)
            time.sleep(0.05)  # blocks the event loop: several steps land meanwhile
        return deltas

    deltas = asyncio.run(main())
    final = deltas[-1].output.samples[0]
    assert len(deltas) < 12, "no step was merged"
    joined = [d for delta in deltas for d in delta.samples]
    assert [t for d in joined for t in d.token_ids] == final.token_ids
    assert "".join(d.text for d in joined) == final.text
    assert [x for d in joined for x in d.logprobs] == final.logprobs
    assert [x for d in joined for x in d.top_logprobs] == final.top_logprobs
    assert [d.finish_reason for d in joined if d.finish_reason] == ["length"]


@pytest.fixture(scope="module")
def proc_engine(llama_dir):
    engine = AsyncEngine.start(EngineConfig(model=str(llama_dir), block_size=4, num_blocks=128))
    yield engine
    engine.shutdown()


def _wait_for(check, seconds=10.0):
    deadline = time.time() + seconds
    while not check() and time.time() < deadline:
        time.sleep(0.02)
    return check()


def test_the_engine_process_streams_what_the_sync_engine_gives(llama_dir, proc_engine):
    expected = Engine(str(llama_dir), block_size=4, num_blocks=128).generate(PROMPTS, GREEDY)

    async def main():
        results = await asyncio.gather(*(_collect(proc_engine, p) for p in PROMPTS),
                                       _collect(proc_engine, PROMPTS[0], SamplingParams(max_tokens=6, seed=1),
                                                BestOfN(3)))
        with pytest.raises(InvalidRequestError):  # checked in this process, before anything is sent
            await _collect(proc_engine, [10**6])

        async def leave_early():
            async for _ in proc_engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True)):
                break

        await leave_early()
        return results

    results = asyncio.run(main())
    # Each delta's text and the output's are the sync engine's (AsyncEngine.start decodes it in the
    # caller's process: the engine process runs with detokenize=False).
    for (text, tokens, final), exp in zip(results, expected):
        assert tokens[0] == exp.samples[0].token_ids == final.samples[0].token_ids
        assert text[0] == final.samples[0].text == exp.samples[0].text and text[0]
    text, tokens, final = results[-1]
    assert all(text[s.index] == s.text and tokens[s.index] == s.token_ids for s in final.samples)
    assert len(results[-1][2].samples) == 3 and results[-1][2].best_index is not None
    assert _wait_for(lambda: proc_engine.stats()["kv_blocks_used"] == 0)  # the abandoned one freed
    assert proc_engine.stats()["requests_finished"] >= 5 and proc_engine.engine is None


class _RebuildsBadly(BestOfN):
    """Pickles here; unpickling it in the engine process raises (as a class it lacks would)."""

    def __reduce__(self):
        return int, ("not a policy",)


class _CannotPickle(BestOfN):
    def __init__(self):
        super().__init__(2)
        self.hook = lambda: None


def test_a_request_that_cannot_cross_to_the_engine_process_fails_alone(proc_engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="rebuilt in the engine process"):
            await _collect(proc_engine, PROMPTS[0], SamplingParams(max_tokens=4), _RebuildsBadly(2))
        with pytest.raises(InvalidRequestError, match="cannot be sent"):
            await _collect(proc_engine, PROMPTS[0], SamplingParams(max_tokens=4), _CannotPickle())
        return await _collect(proc_engine, PROMPTS[1])

    _, tokens, final = asyncio.run(main())
    assert proc_engine.is_running and tokens[0] == final.samples[0].token_ids and len(tokens[0]) == 10
    assert _wait_for(lambda: proc_engine.stats()["requests_in_flight"] == 0)


def test_a_reused_request_id_never_gets_the_old_requests_steps(proc_engine):
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def main():
        results = []
        for _ in range(5):
            stream = proc_engine.generate(PROMPTS[0], long, request_id="same")
            await anext(stream)
            await stream.aclose()  # left early: the abort races the old request's next steps
            results.append(await _collect(proc_engine, PROMPTS[1], short, request_id="same"))
        return results

    for _, tokens, final in asyncio.run(main()):
        assert tokens[0] == final.samples[0].token_ids and len(tokens[0]) == 3


class _Fatal(BaseException):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_that_dies_in_a_thread_fails_its_callers_instead_of_hanging(llama_dir, monkeypatch):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=64)
    aeng = AsyncEngine(eng)

    def fatal():
        raise _Fatal("the loop itself broke")

    monkeypatch.setattr(eng, "step_deltas", fatal)
    with pytest.raises(EngineDeadError, match="loop stopped: _Fatal"):
        asyncio.run(asyncio.wait_for(_collect(aeng, PROMPTS[0]), timeout=10))
    assert not aeng.is_running
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(aeng, PROMPTS[0]))
    aeng.shutdown()


def test_a_killed_engine_process_fails_streams_fast_and_shutdown_leaves_nothing(llama_dir):
    aeng = AsyncEngine.start(EngineConfig(model=str(llama_dir), block_size=4, num_blocks=64))
    pid = aeng._process.pid
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)  # 51 of its 64 blocks

    async def main():
        seen = asyncio.Event()

        async def consume():
            async for _ in aeng.generate(PROMPTS[0], long):
                seen.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(seen.wait(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        start = time.perf_counter()
        with pytest.raises(EngineDeadError, match="exited"):
            await asyncio.wait_for(task, timeout=10)
        return time.perf_counter() - start

    assert asyncio.run(main()) < 5
    assert not aeng.is_running
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(aeng, PROMPTS[0]))
    aeng.shutdown()
    assert not aeng._thread.is_alive()

    aeng = AsyncEngine.start(EngineConfig(model=str(llama_dir), block_size=4, num_blocks=64))
    pid = aeng._process.pid
    asyncio.run(_collect(aeng, PROMPTS[0]))
    aeng.shutdown()
    assert not aeng.is_running and aeng._process.exitcode == 0 and not Path(f"/proc/{pid}").exists()


def test_an_engine_that_cannot_be_built_raises_at_start(tmp_path):
    with pytest.raises(EngineDeadError, match="could not build the engine"):
        AsyncEngine.start(EngineConfig(model=str(tmp_path)))


def test_rows_from_the_engine_process_join_their_requests_deltas():
    """A step's rows (TokenDeltas, engine request ids) and its other deltas (by key) come out as
    one delta per key, samples in index order; a row whose request has no key is dropped."""
    import pickle

    from engine.async_engine import _expand
    from engine.sampling import RequestDelta, SampleDelta, TokenDeltas

    ended = RequestDelta(3, [SampleDelta(1, [9], "c", [-0.1], "length", None, [], [])])
    tokens = TokenDeltas([(3, 2, 7, "b", -0.2), (4, 0, 5, "x", -0.3), (3, 0, 6, "a", -0.4),
                          (5, 0, 1, "", 0.0)])
    tokens = pickle.loads(pickle.dumps(tokens))
    events = [(30, ended), (None, ([30, 40, 30, None], tokens)), (50, InvalidRequestError("bad"))]
    out = dict(_expand(events))
    assert list(out) == [30, 50, 40]
    assert [(s.index, s.token_ids, s.text, s.finish_reason) for s in out[30].samples] == [
        (0, [6], "a", None), (1, [9], "c", "length"), (2, [7], "b", None)]
    assert out[40].request_id == 4 and [s.token_ids for s in out[40].samples] == [[5]]
    assert isinstance(out[50], InvalidRequestError)
    merged = tokens.merge_into([RequestDelta(3, [SampleDelta(1, [9], "c", [-0.1], None, None, [], [])])])
    assert [(d.request_id, [s.index for s in d.samples]) for d in merged] == [
        (3, [0, 1, 2]), (4, [0]), (5, [0])]
