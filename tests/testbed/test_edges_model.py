"""The bundled model (engine/testbed/model, the edges testbed built from nothing; its RECIPE.json):
asked the self-evaluation question, its adapter tells a right path from a wrong arm followed to
its end on held-out problems (the demo's numbers: README, bench/results/demo-full-cpu.json)."""

import random

import pytest

from engine.api import Engine
from engine.testbed import BUNDLED, edges, task_of

MODEL = BUNDLED


@pytest.mark.skipif(not (MODEL / "adapter" / "adapter.safetensors").exists(), reason="no edges model")
def test_edges_model_scores_right_paths_above_wrong_attempts():
    assert task_of(MODEL) is edges
    eng = Engine(str(MODEL), device="cpu", adapter=str(MODEL / "adapter"))
    rng = random.Random(31)
    probs = edges.problems(24, 2024, edges.DEMO_LEVELS)  # the demo's held-out stream
    prompts = [eng.render_chat([{"role": "user", "content": p.question}]) for p in probs]
    right = eng.score(prompts, [p.solution for p in probs])
    wrong = eng.score(prompts, [edges.attempt(rng, p) for p in probs])
    assert all(edges.verify(p.record(), p.solution) == 1.0 for p in probs)
    ordered = sum(r > w for r, w in zip(right, wrong))
    assert ordered >= 22, (right, wrong)  # pairs of one problem: the right path scores higher
    assert sum(right) / 24 > sum(wrong) / 24 + 0.5
