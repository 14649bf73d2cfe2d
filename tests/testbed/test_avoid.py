"""The avoid task (engine/testbed/avoid.py): a path that must not pass one node, whose wrong samples
show their mistake at the edge into that node, mid-path."""

import random

import pytest

from engine.testbed import avoid, load_task


def _arms(p):
    """Every path out of the source along the question's edges: the lines of each arm."""
    out = []
    for first in [e for e in p.edges if e[0] == p.source]:
        lines = [first]
        while lines[-1][1] != p.target:
            lines.append(next(e for e in p.edges if e[0] == lines[-1][1]))
        out.append(lines)
    return out


def test_every_arm_reaches_the_target_at_one_length_and_one_avoids_the_node():
    rng = random.Random(0)
    for level, (arms, depth, length) in enumerate(avoid.LEVELS):
        for _ in range(30):
            p = avoid.make_problem(rng, level)
            assert {*p.path, p.avoid} <= set("".join(p.edges))  # every node named is in the graph
            assert set("".join(p.edges)) <= set(avoid.NODES) and len(set(p.edges)) == len(p.edges)
            paths = _arms(p)
            assert len(paths) == (2 if depth == 1 else arms)
            assert {len(lines) for lines in paths} == {length + 1}
            clean = [lines for lines in paths if all(e[1] != p.avoid for e in lines)]
            assert [avoid.lines(path) for path in clean] == [p.solution.split("\n")[:-1]]
            for lines in paths:
                if lines not in clean:  # runs into the avoided node at its depth
                    assert lines[depth - 1][1] == p.avoid
            assert avoid.verify(p.record(), p.solution) == 1.0
    assert avoid.problems(30, 4) == avoid.problems(30, 4) != avoid.problems(30, 5)
    assert {p.level for p in avoid.problems(12, 4)} == set(range(len(avoid.LEVELS)))
    assert load_task("avoid") is avoid


def test_verifier_refuses_the_avoided_node_made_up_edges_and_a_wrong_or_missing_answer_line():
    p = avoid.make_problem(random.Random(1), 2)
    rec, lines = p.record(), p.solution.split("\n")
    assert lines[0] == f"{p.path[0]}{p.path[1]} {p.path[1]}"  # the edge, then the node it reaches
    assert avoid.verify(rec, "  " + p.solution.replace("\n", " \n ").replace(" ", "  ") + "\n") == 1.0
    assert avoid.verify(rec, "\n".join([lines[0][:3] + p.avoid] + lines[1:])) == 0.0  # names the wrong node
    assert avoid.verify(rec, "\n".join([lines[0][:2]] + lines[1:])) == 0.0  # names none
    assert avoid.verify(rec, "\n".join(lines[:-1])) == 0.0  # no "= T"
    assert avoid.verify(rec, "\n".join(lines[:-1] + [f"= {p.avoid}"])) == 0.0
    assert avoid.verify(rec, "\n".join(lines[:2] + lines[3:])) == 0.0  # a line skipped
    wrong = next(arm for arm in _arms(p) if avoid.lines(arm) != lines[:-1])
    assert avoid.verify(rec, "\n".join(avoid.lines(wrong)) + f"\n= {p.target}") == 0.0  # through it
    with pytest.raises(ValueError, match="not an avoid question"):
        avoid.check("Q: path from A to B: AB", "AB")


def test_attempts_and_corrupted_paths_are_wrong_where_a_sampling_model_goes_wrong():
    rng = random.Random(2)
    kinds = set()
    for level, (_, depth, _) in enumerate(avoid.LEVELS):
        for _ in range(30):
            p = avoid.make_problem(rng, level)
            bad = avoid.attempt(rng, p)
            *lines, named = bad.split("\n")
            assert named == f"= {p.target}" and all(e.split()[0] in p.edges for e in lines)
            assert avoid.check(p.question, bad) == (False, depth - 1)  # good up to the edge into it
            c = avoid.corrupt(rng, p)
            assert avoid.verify(p.record(), c) == 0.0
            *lines, _ = c.split("\n")
            kinds.add("made up" if any(e.split()[0] not in p.edges for e in lines) else "wrong arm")
            assert len(lines) == len(p.path) - 1
    assert kinds == {"made up", "wrong arm"}


def test_partial_paths_show_the_mistake_when_wrong():
    """Right: the right path cut short. Wrong: a wrong arm cut at or after its edge into the avoided
    node, so the mistake is in view (never a cut that needs lookahead)."""
    rng = random.Random(3)
    for level in range(len(avoid.LEVELS)):
        for _ in range(30):
            p = avoid.make_problem(rng, level)
            good = p.solution.split("\n")[:-1]
            right = avoid.partial(rng, p, True).split("\n")
            assert 1 <= len(right) < len(good) and right == good[:len(right)]
            wrong = avoid.partial(rng, p, False).split("\n")
            assert len(wrong) < len(good) and any(e.split()[1] == p.avoid for e in wrong)
            assert all(e.split()[0] in p.edges and e.split()[1] == e[1] for e in wrong)


def test_pretraining_examples_of_the_avoid_task_keep_one_token_per_edge_and_per_node():
    from engine.testbed.pretrain import _example
    from engine.testbed.tokenizer import make_tokenizer

    tok = make_tokenizer(task="avoid")
    rng = random.Random(4)
    for _ in range(50):
        ids, mask = _example(tok, rng, 0.5, task="avoid", attempt_frac=0.4, check_wrong="corrupt",
                             check_questions=8, partial_frac=0.5)
        text = tok.decode(ids, skip_special_tokens=True)
        assert "avoiding" in text and any(mask)
    p = avoid.make_problem(random.Random(5), 3)
    q = tok.convert_ids_to_tokens(tok.encode(p.question))
    assert all(e in q for e in p.edges) and "Ġ" + p.avoid in q
    from engine.model.loader import load_tokenizer
    from engine.testbed import BUNDLED

    for t in (tok, load_tokenizer(str(BUNDLED))):  # its own, and the bundled model's (runs go on from it)
        answer = t.convert_ids_to_tokens(t.encode(p.solution, add_special_tokens=False))
        assert answer[:3] == [p.path[0] + p.path[1], "Ġ" + p.path[1], "Ċ"]  # "DK K\n": edge, node, newline
