"""The path task (engine/testbed/paths.py): every problem has one right path, its solution
verifies, and the verifier refuses each way a sampled path goes wrong."""

import random

import pytest

from engine.testbed.paths import LEVELS, check, corrupt, make_problem, problems, verify


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
