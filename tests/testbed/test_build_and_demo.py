"""The testbed recipe runs end to end at toy size, and `selfeval demo` on the bundled model gives
the table's structure with best-of-16 by self-evaluation clearly above one sample."""

import json

import pytest

from engine.cli import main
from engine.testbed import BUNDLED
from engine.testbed.build import main as build


def test_build_recipe_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "model"
    assert build(["--out", str(out), "--steps", "3", "--data-prompts", "4", "-n", "2",
                  "--checkpoints", "4", "--completions", "1", "--epochs", "1", "--eval-problems", "4",
                  "--check-steps", "2"]) == 0
    recipe = json.loads((out / "RECIPE.json").read_text())
    assert recipe["pretrain"]["config"]["steps"] == 3
    assert recipe["pretrain_check"]["config"]["check_frac"] == 0.5
    assert recipe["data"]["examples"] >= 8
    assert {"greedy_acc", "sample_acc_t1"} <= recipe["base_metrics"].keys()
    assert (out / "adapter" / "adapter.safetensors").exists()
    assert (out / "adapter" / "calibration.json").exists()


needs_bundled = pytest.mark.skipif(not (BUNDLED / "adapter" / "adapter.safetensors").exists(),
                                   reason="no bundled model")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--problems", "48"]) == 0
    return out, json.loads((out / "results.json").read_text())


@needs_bundled
def test_demo_on_the_bundled_model_gives_the_table(demo):
    out, r = demo
    assert {"greedy_acc", "sample_acc", "best_of_n", "adaptive", "prune", "auroc"} <= r.keys()
    assert set(r["best_of_n"]) == {"2", "4", "8", "16"}
    for v in r["best_of_n"].values():
        assert set(v) == {"selfeval", "oracle", "logprob", "confidence"}
        assert v["oracle"] >= max(v["selfeval"], v["logprob"], v["confidence"])
    assert all({"threshold", "avg_samples", "acc", "frac_gain"} <= a.keys() for a in r["adaptive"])
    assert all(1 <= a["avg_samples"] <= 16 for a in r["adaptive"])
    assert all({"checkpoint", "frac_pruned", "acc", "tokens_saved_frac"} <= p.keys() for p in r["prune"])
    assert all(0 < p["frac_pruned"] < 1 and 0 < p["tokens_saved_frac"] < 1 for p in r["prune"])
    assert {"end", "8", "16", "32", "end_within_prompt"} <= r["auroc"].keys()
    h = r["habits"]
    assert 0 <= h["direct_share"] <= 1 and 0 <= h["direct_share_of_selfeval_picks"] <= 1
    for part, present in (("direct_acc", h["direct_share"] > 0), ("worked_acc", h["direct_share"] < 1)):
        assert (h[part] is not None) == present
    for name in ("best_of_n.png", "adaptive.png", "prune.png"):
        assert (out / name).stat().st_size > 1000


@needs_bundled
def test_selfeval_best_of_16_beats_one_sample_clearly(demo):
    """Issue 5's check on the CI set (48 problems: 0.500 against 0.389). On the 300-problem --full run
    the margin is smaller (0.460 against 0.399; best-of-4 0.523): see the README."""
    _, r = demo
    assert r["best_of_n"]["16"]["selfeval"] >= r["sample_acc"] + 0.1


@needs_bundled
def test_selfeval_picks_beat_one_sample(demo):
    """What the bundled model does show: at every n, the self-evaluation's pick is right more often
    than one sample, and it mostly avoids the direct-answer habit."""
    _, r = demo
    assert all(v["selfeval"] > r["sample_acc"] for v in r["best_of_n"].values())
    assert r["habits"]["direct_share_of_selfeval_picks"] < r["habits"]["direct_share"] / 2
