"""The step profiler and `selfeval profile`: phases are timed, the token mix adds up, and the
report carries the policy's savings."""

import json

from engine import Engine, SamplingParams
from engine.cli import main
from engine.profiler import StepProfiler
from engine.testbed import BUNDLED, task_of
from engine.testbed.profile import run_profile


def test_profiler_records_phases_and_token_mix(llama_dir):
    eng = Engine(str(llama_dir), num_blocks=128)
    eng.profiler = prof = StepProfiler()
    outs = eng.generate([[5, 6, 7, 8, 9]], SamplingParams(n=3, max_tokens=6, ignore_eos=True, score=True))
    s = prof.summary()
    assert {"snapshot", "schedule", "prepare", "block_copy", "to_device", "forward", "score", "sample_prep",
            "sample", "update", "detokenize", "policy", "output"} == set(s["phase_seconds"])
    assert s["prefill_tokens"] == 5
    # Every generated token but the first (sampled off the prefill) is computed by a decode or
    # (the last one of each sample) inside its scoring extend.
    assert s["suffix_tokens"] == outs[0].stats.suffix_tokens
    assert {"prefill", "decode", "score"} == set(s["forward_by_kind"])


def test_each_step_record_counts_the_steps_tokens_and_the_cache_after_it(llama_dir):
    """A record's prefill / decode / suffix tokens and context (the cache's length after the
    step) for every kind of step, plain decode steps (counted without a loop) included: checked
    against the sequences and the block manager's lengths once the step is applied."""
    from engine.policies import Prune

    eng = Engine(str(llama_dir), num_blocks=256, block_size=4)
    eng.profiler = prof = StepProfiler()
    record, seen = prof.record, []

    def checked(out, seconds):
        record(out, seconds)
        seen.append((out, [s.num_computed for s in out.seqs], prof.steps[-1]))

    prof.record = checked
    eng.add_request([5, 6, 7, 8, 9], SamplingParams(n=3, max_tokens=7, ignore_eos=True, score=True, seed=1))
    eng.add_request([10, 11], SamplingParams(max_tokens=9, ignore_eos=True, seed=2))
    eng.add_request([12, 13, 14], SamplingParams(max_tokens=8, ignore_eos=True, seed=3),
                    Prune(3, checkpoints=(3,), keep=0.5))
    bm = eng.core.block_manager
    while eng.has_unfinished_requests():
        before = len(seen)
        eng.step_deltas()
        for out, computed, rec in seen[before:]:
            real, suffixes = out.num_real, [len(x) for x in out.suffixes]
            decode = sum(n == 1 and c + 1 == len(s.token_ids) - (s in out.sample_seqs)
                         for s, n, c in zip(out.seqs, real, computed))
            assert (rec.prefill_tokens, rec.decode_tokens, rec.suffix_tokens, rec.seqs) == \
                   (sum(real) - decode, decode, sum(suffixes), len(out.seqs))
            # after the step: suffixes rolled back, so each sequence's cache holds computed + real
            assert rec.context_tokens == sum(c + n for c, n in zip(computed, real))
            assert all(bm.length(s.seq_id) == c + n
                       for s, c, n in zip(out.seqs, computed, real) if s.seq_id in bm)
    kinds = [rec.kind for _, _, rec in seen]
    assert {"prefill", "decode", "score"} <= set(kinds) and kinds.count("decode") >= 3


def test_profile_cli_compares_policies_on_the_same_seeds(llama_dir, tmp_path):
    rc = main(["profile", "--policies", "prune,adaptive", "--model", str(llama_dir), "--problems", "3",
               "-n", "4", "--checkpoint", "4", "--keep", "0.5", "--max-tokens", "10", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    runs = report["policies"]
    assert list(runs) == ["best-of-n", "prune", "adaptive"]  # the baseline runs first, always
    base, prune = runs["best-of-n"], runs["prune"]
    assert prune["samples_pruned"] == 3 * 2 and prune["score_calls"] > 0
    assert prune["vs_baseline"]["tokens_saved"] == base["tokens_generated"] - prune["tokens_generated"] > 0
    assert base["vs_baseline"]["tokens_saved"] == 0 and base["accuracy"] is not None  # testbed verifier
    for r in runs.values():
        assert len(r["series"]["running_samples"]) == r["steps"] > 0
        assert r["peak_kv_blocks"] == max(r["series"]["kv_blocks"]) > 0
        cost = r["scoring_cost"]
        assert cost["steps_with_suffix"] > 0 and 0 <= cost["decode_steps_off_graph_path_for_a_suffix"] <= 1
    assert (tmp_path / "profile.png").stat().st_size > 1000


def test_measured_savings_equal_hand_computed_ones_with_fixed_lengths(llama_dir, tmp_path):
    """ignore_eos: every sample runs to L unless pruned. A sample scored at checkpoint c is dropped
    after c + 1 tokens (its score rides along with the step that computes token c + 1), so with
    P prompts, n samples and k kept: baseline P*n*L tokens, prune P*(k*L + (n-k)*(c+1))."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(3)) + "\n")
    P, n, k, L, c = 3, 4, 2, 12, 4
    report = run_profile(str(llama_dir), ["prune"], str(tmp_path / "out"), n=n, checkpoint=c, keep=k / n,
                         max_tokens=L, prompts=str(prompts), ignore_eos=True, log=lambda *_: None)
    base, prune = report["policies"]["best-of-n"], report["policies"]["prune"]
    assert base["tokens_generated"] == P * n * L
    assert prune["tokens_generated"] == P * (k * L + (n - k) * (c + 1))
    assert prune["vs_baseline"]["tokens_saved"] == P * (n - k) * (L - c - 1)
    assert prune["tokens_saved_online_estimate"] == prune["vs_baseline"]["tokens_saved"]
    assert prune["samples_pruned"] == P * (n - k) and base["accuracy"] is None  # no verifier given


def test_the_online_estimate_of_tokens_saved_is_unbiased_on_the_testbed(tmp_path):
    """With EOS, the samples alive at a checkpoint are the long ones: the estimate takes the
    would-be length of a pruned sample from the samples that went on past it, and lands near the
    measured saving (the mean of all samples would claim far less)."""
    report = run_profile(str(BUNDLED), ["prune"], str(tmp_path), num_problems=24, n=8, keep=0.25,
                         log=lambda *_: None)
    task = task_of(BUNDLED)  # checkpoint and max_tokens default to the task's
    assert report["settings"]["prune"]["checkpoint"] == task.CHECKPOINTS[len(task.CHECKPOINTS) // 2]
    assert report["max_tokens"] == task.MAX_TOKENS
    prune = report["policies"]["prune"]
    measured, estimate = prune["vs_baseline"]["tokens_saved"], prune["tokens_saved_online_estimate"]
    assert measured > 0 and abs(estimate - measured) <= 0.1 * measured, (estimate, measured)
