"""The testbed task: solutions check out, the verifier reads the final answer, the tokenizer keeps
one digit per token and gives Yes / No single tokens, the loss mask covers the assistant turn."""

import random

import pytest

from engine.selfeval import QUESTION, build_spec
from engine.testbed.pretrain import (
    CHECK_QUESTION,
    CHECK_QUESTIONS,
    PretrainConfig,
    _example,
    encode,
    encode_check,
    pretrain,
)
from engine.testbed.task import LEVELS, corrupt, extract_answer, make_problem, problems, verify
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


def test_corrupted_solutions_are_wrong_in_exactly_one_step_and_carry_on():
    rng = random.Random(1)
    for p in problems(300, seed=9):
        bad = corrupt(rng, p)
        assert verify(p.record(), bad) == 0.0
        lines = bad.splitlines()
        assert len(lines) == len(p.steps()) + 1
        wrong, acc = 0, None
        for line in lines[:-1]:
            expr, result = line.split(" = ")
            a = int(expr[: max(expr.rfind("+"), expr.rfind("-", 1))])
            assert acc is None or a == acc  # each step starts from the previous written result
            wrong += eval(expr) != int(result)  # noqa: S307 (digits and +/- only)
            acc = int(result)
        assert wrong == 1 and lines[-1] == f"#### {acc}"


def test_check_task_predicts_only_the_verdict():
    tok = make_tokenizer()
    p = problems(1, seed=2)[0]
    for right, word in ((True, "right"), (False, "wrong")):
        ids, mask = encode_check(tok, p.question, p.solution, right)
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == word + "<|im_end|>"
        assert CHECK_QUESTION in tok.decode(ids) and p.solution in tok.decode(ids)


def test_check_task_asks_one_phrasing_or_several_never_the_selfeval_question(tmp_path):
    tok = make_tokenizer()

    def asked(k, seed=5):
        rng = random.Random(seed)
        texts = [tok.decode(_example(tok, rng, 1.0, check_questions=k)[0]) for _ in range(200)]
        return {q for q in CHECK_QUESTIONS if any(q in t for t in texts)}

    assert asked(1) == {CHECK_QUESTION}
    assert asked(8) == set(CHECK_QUESTIONS) and len(CHECK_QUESTIONS) == 8
    assert asked(3) == set(CHECK_QUESTIONS[:3])
    for q in CHECK_QUESTIONS:  # the adapter still has to learn the self-evaluation question itself
        assert q not in QUESTION and not {"Yes", "No", "over", "better"} & set(q.strip("?.").split())
    with pytest.raises(ValueError, match="check_questions"):
        pretrain(tmp_path, PretrainConfig(steps=1, check_questions=9))


def test_direct_answers_are_verified_and_come_at_the_configured_share():
    tok = make_tokenizer()
    for p in problems(30, seed=3):
        assert p.direct == f"#### {p.answer}" and verify(p.record(), p.direct) == 1.0
    rng = random.Random(4)
    replies = [tok.decode([t for t, m in zip(*_example(tok, rng, 0.0, 0.35)) if m], skip_special_tokens=True)
               for _ in range(2000)]
    direct = sum(r.startswith("####") for r in replies)
    assert 0.30 < direct / len(replies) < 0.40  # binomial sd ~0.011
    assert all(r.count("\n") >= 1 for r in replies if not r.startswith("####"))  # the rest show working
    rng = random.Random(4)
    assert not any(tok.decode([t for t, m in zip(*_example(tok, rng, 0.0)) if m],
                              skip_special_tokens=True).startswith("####") for _ in range(300))
