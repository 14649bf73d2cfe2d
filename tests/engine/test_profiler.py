"""The step profiler and `selfeval profile`: phases are timed, the token mix adds up, and the
report carries the policy's savings."""

import json

from engine import Engine, SamplingParams
from engine.cli import main
from engine.profiler import StepProfiler


def test_profiler_records_phases_and_token_mix(llama_dir):
    eng = Engine(str(llama_dir), num_blocks=128)
    eng.profiler = prof = StepProfiler()
    outs = eng.generate([[5, 6, 7, 8, 9]], SamplingParams(n=3, max_tokens=6, ignore_eos=True, score=True))
    s = prof.summary()
    assert {"schedule", "forward", "sample", "score", "policy"} <= set(s["phase_seconds"])
    assert s["prefill_tokens"] == 5
    # Every generated token but the first (sampled off the prefill) is computed by a decode or
    # (the last one of each sample) inside its scoring extend.
    assert s["suffix_tokens"] == outs[0].stats.suffix_tokens
    assert {"prefill", "decode", "score"} == set(s["forward_by_kind"])


def test_profile_cli_writes_report_and_plot(llama_dir, tmp_path):
    rc = main(["profile", "--policy", "prune", "--model", str(llama_dir), "--problems", "3", "-n", "4",
               "--checkpoint", "4", "--keep", "0.5", "--max-tokens", "10", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["samples_pruned"] == 3 * 2
    assert report["tokens_saved"] > 0 and report["score_calls"] > 0
    assert report["prompt_tokens"] > 0
    assert report["prefix_cache_hit_rate"] == report["cached_prompt_tokens"] / report["prompt_tokens"]
    assert (tmp_path / "profile.png").stat().st_size > 1000
