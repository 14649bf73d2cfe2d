"""The combined scorer (engine.policies.combined): the pairwise fit recovers which feature ranks
right above wrong within a prompt, the scorer applies the saved fit to the engine's samples the way
the demo applies it to their outputs, and serves as a policy's scorer."""

import math
import random

import numpy as np
import pytest

from engine import Engine, SamplingParams
from engine.policies import BestOfN, CombinedScorer
from engine.policies.combined import FEATURES, features, fit_pairwise


def _prompts(rng, n_prompts=60, per=8):
    """Right samples have a higher logprob; the self-evaluation score is noise, except that it is
    higher for right samples in half the prompts (both features carry signal, logprob more)."""
    x, y, g = [], [], []
    for i in range(n_prompts):
        for _ in range(per):
            ok = rng.random() < 0.4
            logit = rng.gauss(1.0 if ok and i % 2 else 0.0, 1.0)
            mlp = rng.gauss(-0.2 if ok else -0.8, 0.2)
            x.append([logit, mlp]), y.append(float(ok)), g.append(i)
    return np.array(x), np.array(y), np.array(g)


def test_pairwise_fit_ranks_right_above_wrong_within_a_prompt(tmp_path):
    x, y, g = _prompts(random.Random(0))
    params = fit_pairwise(x, y, g)
    assert params["features"] == list(FEATURES) and params["pairs"] > 0
    w = params["weights"]
    assert w[1] > w[0] > 0  # both help; log-probability separates more here
    scorer = CombinedScorer(params)
    xe, ye, ge = _prompts(random.Random(1))
    values = np.array([scorer.value(1 / (1 + math.exp(-a)), [b]) for a, b in xe])
    picks = [ye[ge == i][np.argmax(values[ge == i])] for i in np.unique(ge) if ye[ge == i].max() > 0]
    assert np.mean(picks) > 0.9
    path = scorer.save(tmp_path)
    assert CombinedScorer.load(tmp_path).params == CombinedScorer.load(path).params == params
    with pytest.raises(ValueError, match="no prompt has both"):
        fit_pairwise(x[y == 1], y[y == 1], g[y == 1])
    with pytest.raises(ValueError, match="expected"):
        CombinedScorer({**params, "features": ["mean_logprob"]})


def test_features_need_a_score_and_tokens():
    assert features(None, [-1.0]) is None and features(0.5, []) is None
    assert features(0.5, [-1.0, -3.0]) == [0.0, -2.0]
    assert features(1.0, [-1.0])[0] == pytest.approx(math.log((1 - 1e-6) / 1e-6))


def test_combined_scorer_serves_a_policy(llama_dir):
    """On the engine: the policy's pick is the argmax of the scorer over the samples, and the value
    equals what the demo computes from the output (score and logprobs)."""
    eng = Engine(str(llama_dir), block_size=4, num_blocks=256)
    scorer = CombinedScorer({"features": list(FEATURES), "mean": [0.0, -5.0], "std": [1.0, 1.0],
                             "weights": [0.5, 2.0]})
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)
    [out] = eng.generate([[5, 17, 90, 33, 41]], params, policy=BestOfN(4, scorer=scorer))
    values = [scorer.value(s.score, s.logprobs) for s in out.samples]
    assert [s.value for s in out.samples] == pytest.approx(values)
    assert out.best.index == max(range(4), key=lambda i: values[i])
