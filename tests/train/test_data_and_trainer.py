"""Training data (win-tie targets, mid-generation examples) and the adapter trainer: on a
synthetic learnable target the held-out Brier score falls well below the constant predictor's."""

import json
import random

import pytest

from engine import Engine, SamplingParams
from engine.cli import main
from engine.errors import InvalidRequestError
from engine.model.lora import has_adapter
from engine.train.data import TARGETS, build_examples, win_tie_targets
from engine.train.trainer import TrainConfig, auroc, calibration, split_by_prompt, train


def test_build_data_cli_offers_every_target_kind(capsys):
    with pytest.raises(SystemExit):
        main(["build-data", "--help"])
    assert "{" + ",".join(TARGETS) + "}" in capsys.readouterr().out


def test_win_tie_targets():
    assert win_tie_targets([1, 0, 1, 0]) == [1.0, pytest.approx(1 / 3), 1.0, pytest.approx(1 / 3)]
    assert win_tie_targets([3, 1, 2]) == [1.0, 0.0, 0.5]
    assert win_tie_targets([5]) == [0.5]
    # Ties count half: right stays above wrong in every group, an all-wrong group sits at 0.5.
    assert win_tie_targets([1, 0, 1, 0], "win-half") == [pytest.approx(5 / 6), pytest.approx(1 / 6)] * 2
    assert win_tie_targets([0, 0, 0], "win-half") == [0.5] * 3
    assert win_tie_targets([1, 0, 0], "reward") == [1.0, 0.0, 0.0]
    with pytest.raises(InvalidRequestError):
        win_tie_targets([1, 0], "pairwise")
    with pytest.raises(InvalidRequestError):  # P(right) needs a reward in [0, 1], not a reward model's logit
        win_tie_targets([2.5, 0], "reward")


def test_calibration_metrics():
    assert auroc([0.9, 0.8], [0.1, 0.85]) == 0.75
    rep = calibration([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1, 0, 1, 0])
    assert rep["brier"] == 0 and rep["ece"] == 0 and rep["auroc"] == 1.0


def verifier(record, text):
    """A reward the random model sometimes earns: the response holds the letter in the record."""
    return float(record["letter"] in text)


def test_build_examples_end_and_mid(llama_dir):
    eng = Engine(str(llama_dir), num_blocks=256)
    records = [{"prompt": "say a", "letter": "a"}, {"prompt": "say e", "letter": "e"}]
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=0, ignore_eos=True)
    ex = list(build_examples(eng, records, reward=verifier, n=4, checkpoints=(4,), completions=3,
                             params=params, use_tqdm=False))
    end = [e for e in ex if e["kind"] == "end"]
    mid = [e for e in ex if e["kind"] == "mid"]
    assert len(end) == 8 and len(mid) == 8
    for rec_prompt in ("say a", "say e"):
        group = [e for e in end if e["prompt"] == rec_prompt]
        assert [e["target"] for e in group] == win_tie_targets([e["reward"] for e in group])
    assert all(len(e["response_ids"]) == 4 and 0 <= e["target"] <= 1 for e in mid)
    assert eng.num_free_blocks == 256


def test_build_examples_gives_each_prompt_its_own_draws(llama_dir):
    """A fixed seed is reproducible but not shared: the same prompt twice gets different samples
    (one shared seed would make sample i of every prompt take the same random draws)."""
    eng = Engine(str(llama_dir), num_blocks=256)
    records = [{"prompt": "say a", "letter": "a"}] * 2
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)

    def responses():
        ex = build_examples(eng, records, reward=verifier, n=2, checkpoints=(), params=params, use_tqdm=False)
        return [tuple(e["response_ids"]) for e in ex]

    first = responses()
    assert first[:2] != first[2:] and first == responses()


def _synthetic(n, seed):
    """Target 1 when the response uses tokens 10-29, 0 when it uses 30-49: learnable from the
    suffix by attending back to the response."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        good = rng.random() < 0.5
        lo = 10 if good else 30
        out.append({"prompt_ids": [rng.randrange(10, 250) for _ in range(6)],
                    "response_ids": [rng.randrange(lo, lo + 20) for _ in range(5)],
                    "target": float(good), "reward": float(good), "kind": "end"})
    return out


def test_held_out_examples_are_whole_prompts():
    """No prompt has examples on both sides of the split (its samples' prefixes repeat: an
    example-level split scores the held-out set on prompts the adapter trained on)."""
    rng = random.Random(3)
    examples = [{"prompt_ids": [p, 7], "response_ids": [rng.randrange(50)], "target": 0.0}
                for p in range(40) for _ in range(rng.randrange(1, 9))]
    held, train_set = split_by_prompt(examples, 0.1, random.Random(0))
    assert sorted(map(id, held + train_set)) == sorted(map(id, examples))
    assert not {tuple(e["prompt_ids"]) for e in held} & {tuple(e["prompt_ids"]) for e in train_set}
    assert len(examples) // 10 <= len(held) < len(examples) // 10 + 9 and train_set
    one = [{"prompt_ids": [1], "response_ids": [i], "target": 0.0} for i in range(20)]
    held, train_set = split_by_prompt(one, 0.1, random.Random(0))  # one prompt: by example
    assert len(held) == 2 and len(train_set) == 18


def test_trainer_learns_a_learnable_target(llama_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "combined.json").write_text("{}")  # fitted on an earlier adapter
    report = train(str(llama_dir), _synthetic(400, 0), str(tmp_path / "adapter"),
                   TrainConfig(rank=8, lr=1e-2, epochs=4, batch_size=16, eval_frac=0.2, save_every=40))
    cal = report["held_out_calibration"]
    assert cal["brier"] < 0.6 * cal["brier_constant"], cal
    assert cal["auroc"] > 0.85
    assert (tmp_path / "adapter" / "checkpoint-40" / "adapter.safetensors").exists()
    assert not (tmp_path / "adapter" / "combined.json").exists()
    saved = json.loads((tmp_path / "adapter" / "calibration.json").read_text())
    assert saved["held_out_calibration"]["brier"] == cal["brier"]
    # The trained adapter serves: Engine(adapter=...) scores a good response above a bad one.
    eng = Engine(str(llama_dir), num_blocks=64, adapter=str(tmp_path / "adapter"))
    assert has_adapter(eng.model)
    good, bad = [e for e in _synthetic(40, 1)], None
    good = [e for e in good if e["target"] == 1.0][:8]
    bad = [e for e in _synthetic(40, 2) if e["target"] == 0.0][:8]
    s_good = eng.score([e["prompt_ids"] for e in good], [e["response_ids"] for e in good])
    s_bad = eng.score([e["prompt_ids"] for e in bad], [e["response_ids"] for e in bad])
    assert sum(s_good) / 8 > sum(s_bad) / 8 + 0.2


def test_cli_build_data_and_train(llama_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"say {c}", "letter": c}) for c in "aeio"))
    data = tmp_path / "data.jsonl"
    rc = main(["build-data", "--model", str(llama_dir), "--prompts", str(prompts), "--out", str(data),
               "--verifier", "tests.train.test_data_and_trainer:verifier", "-n", "3",
               "--checkpoints", "3", "--completions", "2", "--max-tokens", "6"])
    assert rc == 0
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    assert {e["kind"] for e in lines} <= {"end", "mid"} and sum(e["kind"] == "end" for e in lines) == 12
    rc = main(["train", "--model", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "ad"),
               "--epochs", "1", "--rank", "4", "--eval-frac", "0.25"])
    assert rc == 0 and (tmp_path / "ad" / "adapter.safetensors").exists()
    assert main(["build-data", "--model", str(llama_dir), "--prompts", str(prompts),
                 "--out", str(data)]) == 2  # neither verifier nor reward model
