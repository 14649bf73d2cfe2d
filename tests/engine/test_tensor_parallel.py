"""Tensor parallelism on the CPU (gloo): TP=2 against TP=1 on random llama, qwen2 and qwen3
checkpoints, one with fewer KV heads than ranks and a vocabulary that does not split evenly, all
with a LoRA adapter loaded: identical greedy tokens, logits and self-evaluation scores within
float32 tolerance, n > 1 under a Prune policy; a rank killed mid-run fails the engine fast and
leaves no process behind."""

import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import Engine, SamplingParams
from engine.errors import CheckpointError, WorkerError
from engine.model.loader import load_model
from engine.model.lora import LoraConfig, init_adapter, save_adapter
from engine.policies import Prune
from engine.step_input import prepare_step
from engine.testing.make_model import make_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, score=True)
PROMPTS = [[5, 6, 7, 8, 9], [20, 21, 22]]


@pytest.fixture(scope="module")
def checkpoints(model_dirs, tmp_path_factory):
    """Each checkpoint with an adapter whose B is not zero (so it changes the scores)."""
    root = tmp_path_factory.mktemp("tp")
    dirs = dict(model_dirs)
    # One KV head for two ranks (replicated), and 385 vocabulary rows (the last rank's padded).
    dirs["llama-kv1"] = make_model(root / "llama-kv1", "llama", seed=4, num_key_value_heads=1, vocab_size=385)
    out = {}
    for name, path in dirs.items():
        model, _ = load_model(path)
        init_adapter(model, LoraConfig(rank=4, alpha=8), seed=1, b_std=0.2)
        out[name] = (str(path), str(save_adapter(model, root / f"adapter-{name}")))
    return out


def _logits(eng: Engine, ids: list[int], suffix: int) -> torch.Tensor:
    eng.block_manager.allocate(0, 0)
    try:
        return eng.runner.execute(prepare_step(eng.block_manager, [0], [ids], None, [suffix]))
    finally:
        eng.block_manager.free(0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama-kv1"])
def test_two_ranks_give_what_one_gives(checkpoints, arch):
    path, adapter = checkpoints[arch]
    one = Engine(path, num_blocks=64, adapter=adapter)
    with Engine(path, num_blocks=64, adapter=adapter, tensor_parallel_size=2) as two:
        assert two.runner.kv_cache.shape[-2] == max(1, one.runner.kv_cache.shape[-2] // 2)
        ids = list(range(5, 40))
        torch.testing.assert_close(_logits(two, ids, 6), _logits(one, ids, 6), atol=1e-4, rtol=1e-4)
        got, want = two.generate(PROMPTS, GREEDY), one.generate(PROMPTS, GREEDY)
        for g, w in zip(got, want):
            assert g.samples[0].token_ids == w.samples[0].token_ids
            assert g.samples[0].score == pytest.approx(w.samples[0].score, abs=1e-5)
        if arch == "llama":
            params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)
            policy = Prune(4, checkpoints=(4,), keep=0.5)
            got, want = two.generate(PROMPTS, params, policy), one.generate(PROMPTS, params, policy)
            for g, w in zip(got, want):
                assert [s.token_ids for s in g.samples] == [s.token_ids for s in w.samples]
                assert [s.pruned_at for s in g.samples] == [s.pruned_at for s in w.samples]
                assert g.best_index == w.best_index
        assert two.num_free_blocks == 64


def test_a_killed_rank_fails_the_engine_fast_and_leaves_no_process(checkpoints):
    path, _ = checkpoints["llama"]
    eng = Engine(path, num_blocks=64, tensor_parallel_size=2)
    [worker] = eng.core.tp.workers
    eng.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    eng.step()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.perf_counter()
    with pytest.raises(WorkerError, match="rank 1 exited"):
        while True:
            eng.step()
    assert time.perf_counter() - start < 10
    worker.join(timeout=5)
    assert not worker.is_alive() and not Path(f"/proc/{worker.pid}").exists()
    with pytest.raises(WorkerError):  # at once: the engine knows it cannot step
        eng.step()
    eng.shutdown()
    with Engine(path, num_blocks=64, tensor_parallel_size=2) as again:  # the group was left cleanly
        assert again.generate([PROMPTS[1]], GREEDY)[0].samples[0].token_ids


def test_ranks_wait_idle_past_the_collective_timeout(checkpoints):
    """A server idles between requests: waiting for rank 0 is not a collective that times out."""
    path, _ = checkpoints["llama"]
    with Engine(path, num_blocks=64, tensor_parallel_size=2, tensor_parallel_timeout=1.0) as eng:
        first = eng.generate([PROMPTS[0]], GREEDY)[0].samples[0].token_ids
        time.sleep(3)
        assert all(p.is_alive() for p in eng.core.tp.workers)
        assert eng.generate([PROMPTS[0]], GREEDY)[0].samples[0].token_ids == first


def test_an_engine_dropped_without_shutdown_stops_its_ranks_and_a_second_shutdown_is_harmless(checkpoints):
    path, _ = checkpoints["llama"]
    eng = Engine(path, num_blocks=64, tensor_parallel_size=2)
    [worker] = eng.core.tp.workers
    del eng
    gc.collect()
    worker.join(timeout=10)
    assert not worker.is_alive()
    first = Engine(path, num_blocks=64, tensor_parallel_size=2)  # the group was released
    first.shutdown()
    with Engine(path, num_blocks=64, tensor_parallel_size=2) as second:
        first.shutdown()  # must not tear down the group `second` made
        assert second.generate([PROMPTS[0]], GREEDY)[0].samples[0].token_ids


def test_ctrl_c_on_rank_0_alone_interrupts_the_call_and_the_engine_goes_on(checkpoints):
    """A notebook's interrupt reaches rank 0 only: the step in flight finishes on every rank, is
    undone, and the engine steps on."""
    path, _ = checkpoints["llama"]
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    with Engine(path, num_blocks=256, tensor_parallel_size=2) as eng:
        want = eng.generate([PROMPTS[1]], GREEDY)[0].samples[0].token_ids
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            eng.generate([PROMPTS[0]] * 4, long)
        timer.join()
        for rid in list(eng.core.requests):
            eng.abort(rid)
        assert eng.generate([PROMPTS[1]], GREEDY)[0].samples[0].token_ids == want
        assert eng.num_free_blocks == 256


def test_a_model_that_does_not_split_is_refused_before_any_process_starts(checkpoints):
    path, _ = checkpoints["llama"]  # 4 query heads
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="tensor_parallel_size 3 does not divide num_attention_heads 4"):
        Engine(path, num_blocks=64, tensor_parallel_size=3)
    assert time.perf_counter() - start < 5
