"""Every benchmark script runs end to end at toy sizes on any device and writes its results file."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_bench_times_every_kernel(tmp_path):
    pytest.importorskip("triton")
    metrics = _load("kernel_bench").main(["--toy", "--reps", "1", "--out", str(tmp_path)])
    [path] = tmp_path.glob("kernels-*.json")
    record = json.loads(path.read_text())
    assert {"device", "torch", "triton", "date", "metrics"} <= record.keys()
    ops = {(r["op"], r["impl"]) for r in metrics["kernels"]}
    for op in ("rms_norm+residual", "silu_and_mul", "rotary", "store_kv", "decode_attention",
               "extend_attention", "sample", "lora_masked (1/8 rows)"):
        assert (op, "torch") in ops and (op, "triton") in ops
    assert ("rotary+store_kv", "fused") in ops
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in metrics["kernels"])


@pytest.mark.parametrize("shapes", [[], ["--toy"]], ids=["8b-bf16", "toy-fp32"])
def test_every_kernel_compiles_for_sm90(tmp_path, shapes):
    # A subprocess: the check must import triton without the interpreter this test run uses.
    pytest.importorskip("triton.backends.nvidia.driver")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "compile_check.py"), "--out-dir", str(tmp_path),
                           *shapes], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads(next(tmp_path.glob("compile_check-sm90*.json")).read_text())
    assert record["failures"] == []
    kernels = {r["kernel"] for r in record["kernels"]}
    for name in ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel", "_store_kv_kernel",
                 "_rotary_store_kv_kernel", "_decode_partial_kernel", "_decode_reduce_kernel",
                 "_prefix_partial_kernel", "_extend_kernel", "_sample_partial_kernel",
                 "_sample_finish_kernel", "_lora_shrink_kernel", "_lora_expand_kernel"):
        assert name in kernels, name
    if not shapes:  # the model's own steps at the 8B shape: its call sites compile too
        ops = {r["op"] for r in record["kernels"]}
        assert {"model: prefills + decodes + adapter", "model: forked samples decoding"} <= ops
    # none spills to local memory (with this Triton; bench/results/compile_check-sm90*.json)
    spills = [(r["op"], r["num_warps"], r["stack"], r["local"]) for r in record["kernels"]
              if r["stack"] or r["local"]]
    assert spills == []


def test_fork_bench_reports_latency_and_block_ratio(tmp_path):
    metrics = _load("fork").main(["--toy", "--out", str(tmp_path)])
    assert set(metrics["fork_us"]) == {"16", "2048"} and all(v > 0 for v in metrics["fork_us"].values())
    # Forked samples share the prompt: the peak is the prompt once plus the responses.
    assert 1.0 <= metrics["n16_block_ratio"] <= 1.1
    assert metrics["n16"]["independent_blocks"] > 5 * metrics["n16"]["peak_blocks"]
    assert json.loads(next(tmp_path.glob("fork-*.json")).read_text())["metrics"]["n16_block_ratio"]


def test_selfeval_cost_bench_reports_the_ratios(tmp_path):
    metrics = _load("selfeval_cost").main(["--toy", "--out", str(tmp_path)])
    assert set(metrics["score_over_decode"]) == {"1/64", "4/256"}
    assert all(v > 0 for v in metrics["score_over_decode"].values())
    assert set(metrics["naive_over_score"]) == {"1/64", "4/256"}
    record = json.loads(next(tmp_path.glob("selfeval_cost-*.json")).read_text())
    assert {"device", "torch", "triton", "date"} <= record.keys()


def test_throughput_bench_runs_engine_roofline_and_transformers(tmp_path):
    metrics = _load("throughput").main(["--toy", "--requests", "4", "--out", str(tmp_path)])
    keys = ("tokens_per_s", "roofline_tokens_per_s", "hf_tokens_per_s", "bs1_ms_per_token", "bs1_floor_ms")
    for key in keys:
        assert metrics[key] > 0, key
    assert metrics["steps"]["decode_tokens"] < metrics["output_tokens"]  # first tokens come off prefills
    assert json.loads(next(tmp_path.glob("throughput-*.json")).read_text())["metrics"]["tokens_per_s"] > 0


def test_throughput_bench_on_cpu_compares_engine_and_transformers_on_the_same_tokens(tmp_path):
    argv = ["--device", "cpu", "--batch-sizes", "1,3", "--prompt-len", "16", "--new-tokens", "4",
            "--reps", "1", "--out", str(tmp_path)]
    metrics = _load("throughput").main(argv)
    assert [row["batch"] for row in metrics["by_batch"]] == [1, 3]
    for row in metrics["by_batch"]:
        assert row["engine_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["vs_hf"] > 0
        # Four greedy tokens leave no room for a late near-tie flip: every request matches.
        assert row["same_requests"] == row["requests"] and row["first_mismatch"] is None
        # The matmul floor is a floor: the whole run takes longer than its weight GEMMs alone.
        assert 0 < row["run_matmul_floor_s"] < min(row["engine_seconds"])
        assert 0 < row["decode_step_matmul_floor_ms"] and 0 < row["prefill_matmul_floor_s"]
        assert row["engine_prefill_s"] > 0 and row["hf_prefill_s"] > 0
    # The reps repeat the prompts: a prefix cache would skip the engine's prefill from the 2nd on.
    assert metrics["engine_prefix_caching"] is False
    record = json.loads(next(tmp_path.glob("throughput-cpu.json")).read_text())
    assert record["workload"] == "cpu_vs_hf" and record["metrics"]["hf_cache"] in ("dynamic", "static")


def test_prefix_cache_bench_measures_both_workloads(tmp_path):
    metrics = _load("prefix_cache").main(["--toy", "--requests", "8", "--system", "64", "--tail", "8",
                                          "--max-tokens", "4", "--repeats", "1", "--out", str(tmp_path)])
    shared_on, shared_off = metrics["shared_on"], metrics["shared_off"]
    assert shared_off["cached_prompt_tokens"] == 0 and shared_off["computed_prompt_tokens"] == 8 * 72
    # One request computes the system prompt; the others take its blocks and compute their tails.
    assert shared_on["computed_prompt_tokens"] + shared_on["cached_prompt_tokens"] == 8 * 72
    assert metrics["prefill_reduction"] > 0.7
    assert metrics["distinct_on"]["cached_prompt_tokens"] == 0
    assert json.loads(next(tmp_path.glob("prefix_cache-*.json")).read_text())["metrics"]["prefill_reduction"]


def test_async_overhead_bench_compares_sync_and_async(tmp_path):
    metrics = _load("async_overhead").main(["--requests", "6", "--max-tokens", "4", "--repeats", "1",
                                            "--out", str(tmp_path)])
    assert metrics["same_tokens"] and metrics["sync_seconds"] > 0 and metrics["async_seconds"] > 0
    assert metrics["handoff_us"] > 0
    assert json.loads(next(tmp_path.glob("async_overhead-*.json")).read_text())["metrics"]["same_tokens"]


def test_serve_load_bench_runs_a_live_server_without_errors(tmp_path):
    pytest.importorskip("fastapi")
    metrics = _load("serve_load").main(["--requests", "9", "--concurrency", "3", "--max-tokens", "10",
                                        "--out", str(tmp_path)])
    assert metrics["errors"] == 0 and metrics["kv_blocks_used_after"] == 0
    assert metrics["tokens_per_s"] > 0 and metrics["offline_tokens_per_s"] > 0
    assert metrics["offline_same_concurrency_tokens_per_s"] > 0
    assert metrics["engine_loop"] == "process" and metrics["cpu_seconds_engine_process"] > 0
    assert metrics["offline_same_concurrency_cpu_seconds"] > 0
    assert metrics["engine_cpu_over_offline_per_token"] > 0
    assert set(metrics["ttft_p50_s_by_kind"]) == {"plain", "best_of_4", "prune"}
    assert json.loads(next(tmp_path.glob("serve_load-*.json")).read_text())["metrics"]["errors"] == 0


def test_scoring_overhead_bench_keeps_tokens_identical(tmp_path):
    argv = ["--prompts", "2", "-n", "2", "--max-tokens", "24", "--reps", "1", "--hidden", "32",
            "--stagger", "3"]
    metrics = _load("scoring_overhead").main(argv + ["--out", str(tmp_path)])
    assert metrics["identical_tokens"] and metrics["suffix_tokens"] > 0
    assert metrics["scored_over_plain"] > 0 and metrics["scored_steps"] >= metrics["plain_steps"]


def test_host_overhead_bench_splits_each_step_by_phase(tmp_path):
    metrics = _load("host_overhead").main(["--steps", "12", "--batches", "1,16", "--out", str(tmp_path)])
    assert (tmp_path / "host_overhead-cpu.json").exists()
    rows = {(r["case"], r["step"]): r for r in metrics["rows"]}
    assert {("b1", "decode"), ("b16", "decode"), ("b16+score", "decode"), ("b16+score", "score"),
            ("b16+final-only", "decode"), ("b16+general-text", "decode"), ("b16+process", "decode"),
            ("b16+process-objects", "decode"), ("b16-n16+process", "decode")} <= rows.keys()
    for r in rows.values():
        assert 0 < r["host_ms"] < r["step_ms"] and r["forward"] > 0
        assert r["schedule"] > 0 and r["prepare"] > 0 and r["output"] > 0
        assert (r["emit"] > 0) == ("process" in r["case"])
    assert rows[("b16+score", "score")]["score"] > 0 and rows[("b16", "decode")]["score"] == 0


def test_sampling_cpu_bench_times_the_sampler_with_equal_tokens(tmp_path):
    metrics = _load("sampling_cpu").main(["--shapes", "8x300,4x2000", "--reps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "sampling_cpu-cpu.json").exists()
    assert [r["shape"] for r in metrics["rows"]] == ["8x300", "4x2000", "8x300", "4x2000"]
    assert all(r["tokens_equal"] and r["cpu_ms"] > 0 and r["torch_hash_ms"] > 0 for r in metrics["rows"])


def test_cpu_attention_bench_times_both_paths_on_mixed_steps(tmp_path):
    from kernels import cpu_ops

    if cpu_ops.extension() is None:
        pytest.skip("engine._cpu is not built")
    metrics = _load("cpu_attention").main(["--cases", "3", "--reps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "cpu_attention-cpu.json").exists()
    assert [r["chunks"] for r in metrics["rows"]] == ["0 x 1", "4 x 8", "4 x 32"]
    assert all(r["cpp_ms"] > 0 and r["torch_with_plan_ms"] > 0 and r["max_error"] < 1e-4
               for r in metrics["rows"])


def test_async_scheduling_bench_runs_ahead_with_equal_tokens(tmp_path):
    metrics = _load("async_scheduling").main(["--steps", "6", "--batches", "1,8", "--out", str(tmp_path)])
    assert (tmp_path / "async_scheduling-cpu.json").exists()
    assert metrics["tokens_equal"] is True
    modes = {(r["batch"], r["mode"]): r for r in metrics["rows"]}
    assert set(modes) == {(1, "sync"), (1, "async"), (8, "sync"), (8, "async")}
    for (_, mode), r in modes.items():
        assert r["step_ms"] > 0 and r["ran_ahead"] == (6 if mode == "async" else 0)
    assert [s["batch"] for s in metrics["summary"]] == [1, 8]


def test_combined_scorer_probe_fits_and_judges_on_held_out_problems(tmp_path):
    metrics = _load("combined_scorer").main(["--fit", "6", "--eval", "6", "-n", "4", "--out", str(tmp_path)])
    fits = {(r["scorer"], r["fit"]) for r in metrics["rows"]}
    assert ("mean_logprob", "-") in fits and ("selfeval_logit", "-") in fits
    assert 0 <= metrics["greedy"] <= 1
    pair = "selfeval_logit+mean_logprob"
    assert (pair, "pointwise") in fits and (pair, "pairwise") in fits
    fitted = [r for r in metrics["rows"] if r["fit"] != "-"]
    assert all(len(r["weights"]) == r["scorer"].count("+") + 1 + (r["fit"] == "pointwise") for r in fitted)
    assert json.loads(next(tmp_path.glob("combined_scorer-*.json")).read_text())["metrics"]["setup"]["n"] == 4


def test_combined_scorer_save_writes_the_pairwise_fit_beside_the_adapter(tmp_path):
    """--save: the two-feature pairwise fit on the training problems lands in the model's adapter
    directory as combined.json, which CombinedScorer loads."""
    import shutil

    from engine.policies import CombinedScorer
    from engine.testbed import BUNDLED

    model = tmp_path / "model"
    shutil.copytree(BUNDLED, model, ignore=shutil.ignore_patterns("combined.json"))
    _load("combined_scorer").main(["--model", str(model), "--fit", "12", "--eval", "4", "-n", "8",
                                   "--out", str(tmp_path), "--save"])
    scorer = CombinedScorer.load(model / "adapter")
    assert scorer.params["fit"]["problems"] == 12 and scorer.params["pairs"] > 0
    assert len(scorer.weights) == 2 and scorer.weights[0] > 0  # the self-evaluation score counts
    assert scorer.value(0.9, [-0.1]) > scorer.value(0.1, [-0.1])


def test_check_probe_reads_the_checking_verdict_on_whole_and_cut_short_paths(tmp_path):
    """On the bundled model, whose pretraining taught it to check whole paths: right ones verdict
    above wrong attempts (bench/results/check_probe-cpu.json: AUROC 1.0 on 240 problems)."""
    metrics = _load("check_probe").main(["--problems", "12", "--out", str(tmp_path)])
    assert metrics["whole_vs_arm"] >= 0.9
    mean = metrics["whole_verdict_mean"]  # the verdict reads the path: right above wrong, spread out
    assert mean["right"] > mean["arm"] and metrics["whole_verdict_sd"] > 0.5 * (mean["right"] - mean["arm"])
    cuts = {r["cut"] for r in metrics["rows"]}
    assert "whole" in cuts and {1, 2} <= cuts
    for r in metrics["rows"]:
        assert r["hops_left"] == (0 if r["cut"] == "whole" else r["length"] - r["cut"])
        assert (r["auroc_vs_arm"] is None) == (r["right"] == 0 or r["arm"] == 0)
    assert json.loads(next(tmp_path.glob("check_probe-*.json")).read_text())["metrics"]["problems"] == 12
