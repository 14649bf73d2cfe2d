"""The path task (engine/testbed/paths.py): every problem has one right path, its solution
verifies, and the verifier refuses each way a sampled path goes wrong."""

import random

import pytest

from engine.testbed.paths import LEVELS, attempt, check, corrupt, make_problem, problems, verify


def test_solutions_verify_and_every_wrong_arm_fails():
    rng = random.Random(0)
    for level, (arms, length) in enumerate(LEVELS):
        for _ in range(30):
            p = make_problem(rng, level)
            assert len(p.edges) == arms * length and len(set("".join(p.edges))) == 1 + arms * length
            assert verify(p.record(), p.solution) == 1.0
            assert check(p.question, p.solution) == (True, length)
            # Follow each other arm to its end: valid edges, wrong end.
            for first in (e for e in p.edges if e[0] == p.source and e != p.path[0] + p.path[1]):
                lines, at = [first], first[1]
                while nxt := [e for e in p.edges if e[0] == at]:
                    lines.append(nxt[0])
                    at = nxt[0][1]
                assert verify(p.record(), "\n".join(lines)) == 0.0
                assert check(p.question, "\n".join(lines)) == (False, length)
            # The sampled failure: a wrong arm, then an edge that is not in the question to the target.
            fake = "\n".join(lines[:-1] + [lines[-1][0] + p.target])
            assert verify(p.record(), fake) == 0.0


def test_verifier_refuses_broken_lines_and_accepts_surrounding_whitespace():
    p = make_problem(random.Random(3), 3)
    assert verify(p.record(), "\n" + p.solution + "\n") == 1.0
    lines = p.solution.split("\n")
    assert verify(p.record(), "\n".join(lines[:-1])) == 0.0  # stops short of the target
    assert verify(p.record(), "\n".join(lines + lines[-1:])) == 0.0  # a line past the target
    assert verify(p.record(), "\n".join(lines[1:])) == 0.0  # does not start at the source
    assert verify(p.record(), p.solution.replace("\n", " ")) == 0.0
    assert verify(p.record(), "") == 0.0
    with pytest.raises(ValueError):
        check("Q: 1+2 = ?", p.solution)


def test_problem_sets_are_reproducible_and_spread_over_levels():
    a, b = problems(60, seed=5), problems(60, seed=5)
    assert a == b and a != problems(60, seed=6)
    assert {p.level for p in a} == set(range(len(LEVELS)))


def test_corrupted_paths_are_wrong_and_look_like_sampled_ones():
    """The checking task's wrong paths: another arm to its end (every line an edge of the
    question), or that with a last edge to the target that the question does not have."""
    rng = random.Random(1)
    kinds = set()
    for level, (_, length) in enumerate(LEVELS):
        for _ in range(40):
            p = make_problem(rng, level)
            bad = corrupt(rng, p)
            assert verify(p.record(), bad) == 0.0 and bad.count("\n") == length - 1
            lines = bad.split("\n")
            assert lines[0][0] == p.source and lines[0] != p.solution.split("\n")[0]
            kinds.add(check(p.question, bad)[1] == length)  # all edges real, or the last one fake
    assert kinds == {True, False}


def test_attempts_follow_the_question_edges_down_a_wrong_arm():
    """A wrong attempt (pretraining's attempt_frac): every line an edge of the question, each
    starting where the last ended, down another arm to its end; never the target."""
    rng = random.Random(2)
    for level, (arms, length) in enumerate(LEVELS):
        firsts = set()
        for _ in range(40):
            p = make_problem(rng, level)
            bad = attempt(rng, p)
            assert verify(p.record(), bad) == 0.0
            assert check(p.question, bad) == (False, length)  # all `length` lines real, wrong end
            assert bad.split("\n")[0] != p.solution.split("\n")[0]
            others = sorted(e for e in p.edges if e[0] == p.source and e != p.path[0] + p.path[1])
            firsts.add(others.index(bad.split("\n")[0]))
        assert firsts == set(range(arms - 1))  # every wrong arm is taken


def test_pretraining_mixes_in_attempts_at_the_given_share():
    from engine.testbed.pretrain import _example
    from engine.testbed.tokenizer import make_tokenizer

    tok = make_tokenizer(task="paths")
    rng = random.Random(4)
    for share in (0.0, 0.3):
        right = []
        for _ in range(400):
            ids, mask = _example(tok, rng, 0.0, task="paths", attempt_frac=share)
            start = mask.index(True)
            question = tok.decode(ids[:start], skip_special_tokens=True).split("\n")[1]
            reply = tok.decode(ids[start:], skip_special_tokens=True)
            ok, good = check(question, reply)
            assert good == len(reply.split("\n"))  # right or an attempt: every line a real edge
            right.append(ok)
        assert abs((1 - sum(right) / len(right)) - share) < 0.07
