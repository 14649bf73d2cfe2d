"""The testbed task: solutions check out, the verifier reads the final answer, the tokenizer keeps
one digit per token and gives Yes / No single tokens, the loss mask covers the assistant turn."""

import random

from engine.selfeval import build_spec
from engine.testbed.pretrain import encode
from engine.testbed.task import LEVELS, extract_answer, make_problem, problems, verify
from engine.testbed.tokenizer import make_tokenizer


def test_solutions_are_right_and_verified():
    rng = random.Random(0)
    for level in range(len(LEVELS)):
        for _ in range(50):
            p = make_problem(rng, level)
            expr = p.question.removeprefix("Q: ").removesuffix(" = ?")
            assert eval(expr) == p.answer  # noqa: S307 (digits and +/- only)
            assert verify(p.record(), p.solution) == 1.0
            assert verify(p.record(), p.solution.replace(f"#### {p.answer}", f"#### {p.answer + 1}")) == 0.0
    assert extract_answer("no answer here") is None
    assert extract_answer("1+2 = 3\n#### -14") == -14


def test_problem_sets_are_reproducible_and_spread_over_levels():
    a, b = problems(60, seed=5), problems(60, seed=5)
    assert a == b and a != problems(60, seed=6)
    assert {p.level for p in a} == set(range(len(LEVELS)))


def test_tokenizer_digits_yes_no_and_loss_mask():
    tok = make_tokenizer()
    ids = tok.encode("12345+678", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("12345+678")
    spec = build_spec(tok)
    assert tok.decode([spec.yes_id]) == "Yes" and tok.decode([spec.no_id]) == "No"
    p = problems(1, seed=0)[0]
    full, mask = encode(tok, p.question, p.solution)
    assert len(full) == len(mask) and full[-1] == tok.eos_token_id
    assert tok.decode([t for t, m in zip(full, mask) if m], skip_special_tokens=True) == p.solution
