"""The path task with one token per edge (`--task edges`): the same graphs and questions as
engine.testbed.paths, over the nodes A-P, but the tokenizer gives every edge "KQ" a token of its own
(EDGE_TOKENS), so an answer line is one token and a newline.

Why a third task: on `paths` an edge is two letter tokens, and whether a line is an edge of the
question is a lookup of a pair; in every format tried (bench/results/testbed-paths-cpu.json) the
model never learned it, so its checks saw only where a path ends. Here that lookup is one token
matching one token of the question (4 layers still learned it slowly, 6 did: results in
bench/results/testbed-edges-cpu.json), while solving still needs lookahead (which arm reaches the
target). A sampled path goes wrong at its first edge (a wrong arm, chosen as confidently as the
right one) and shows it later: an edge the question does not have, an edge that does not start
where the last ended, or an end that is not the target.

The answer ends with a line naming the node reached ("= D", the node's own token, as the question
names the target), and `attempt` writes the wrong attempts that pretraining can mix in: with them
(and the checking task on them) the model's wrong samples end at the wrong arm's end and say so,
and its self-evaluation sees it (bench/results/testbed-edges-cpu.json, runs att1-att4).

Levels 6-9 (4 and 5 arms) and `partial` (the checking task asked of a path cut short) are for
pruning mid-path, where a right sample must be rare (so random pruning loses) and its arm told
from a wrong one before the path ends. The model pretrained with them (runs partial1-2 of that
file) tells a cut-short path's made-up edge (AUROC 0.93) but not its wrong arm (0.51): that needs
the lookahead solving lacks. The bundled model and the demo use levels 0-5."""

from __future__ import annotations

import random

from engine.testbed import paths
from engine.testbed.paths import Problem  # noqa: F401  (the task's names)

NAME = "edges"
NODES = "ABCDEFGHIJKLMNOP"  # 16 nodes (the largest level needs 13), 240 edge tokens; not Q, as in "Q:"
EDGE_TOKENS = [a + b for a in NODES for b in NODES if a != b]
# paths' six shapes, then four with more arms (a sample that picks its arm at random is right 1 time
# in 4 or 5: problems where a right sample is rare, so pruning at random loses some)
LEVELS = paths.LEVELS + [(4, 2), (5, 2), (4, 3), (5, 3)]
PRETRAIN_LEVELS = [0, 1, 2, 3, 4, 5]  # pretraining's default (the bundled model's first stages)
DEMO_LEVELS = paths.DEMO_LEVELS
DATA_LEVELS = paths.DATA_LEVELS
# A line is 2 tokens (the edge and a newline): checkpoints right after the 1st, 2nd and 3rd edge.
CHECKPOINTS = (1, 3, 5)
DATA_CHECKPOINTS = (1, 3, 5)
MAX_TOKENS = 16
SPLIT_LETTERS = False


def make_problem(rng: random.Random, level: int) -> Problem:
    return paths.make_problem(rng, level, NODES, final=True, table=LEVELS)


def check(prompt: str, text: str) -> tuple[bool, int]:
    """paths.check with the answer line ("= D", the node the path ends at) required."""
    return paths.check(prompt, text, final=True)


def verify(record: dict, text: str) -> float:
    """1.0 when the lines are a path of the question's edges from the source to the target and the
    last line names the target; else 0.0."""
    return float(check(record["prompt"], text)[0])


def attempt(rng: random.Random, problem: Problem) -> str:
    """paths.attempt, answered with the node the wrong arm ends at."""
    lines = paths.attempt(rng, problem)
    return f"{lines}\n= {lines[-1]}"  # the last edge's second node


def problems(n: int, seed: int, levels: list[int] | None = None) -> list[Problem]:
    """n problems, levels cycled evenly (PRETRAIN_LEVELS by default)."""
    return paths.problems(n, seed, levels if levels is not None else PRETRAIN_LEVELS, NODES, final=True,
                          table=LEVELS)


def partial(rng: random.Random, problem: Problem, right: bool) -> str:
    """A path cut short, for the checking task asked mid-way (PretrainConfig.partial_frac): the
    first k edges (1 <= k < the path's length) of the right path when right, which lead on to the
    target; else of a wrong attempt (another arm: its end is not the target, which the nodes
    still ahead show), or, a third of the time, the right path's first k - 1 edges and then an
    edge the question does not have (a sampling slip, visible where it is made)."""
    k = rng.randrange(1, len(problem.path) - 1)
    good = [a + b for a, b in zip(problem.path, problem.path[1:])]
    if right:
        return "\n".join(good[:k])
    if rng.random() < 1 / 3:
        at = problem.path[k - 1]
        made_up = [at + b for b in NODES if b != at and at + b not in problem.edges]
        return "\n".join(good[:k - 1] + [rng.choice(made_up)])
    return "\n".join(paths.attempt(rng, problem).split("\n")[:k])


def corrupt(rng: random.Random, problem: Problem) -> str:
    """A wrong path shaped like the ones a sampling model writes (it picks an arm at random and,
    on a wrong one, makes its way to the target at the right length): a quarter of the time
    another arm followed to its end; otherwise another arm for k edges, then one bad edge onto the
    target's arm where the right path would be after k + 1 edges, and the right path's real edges
    from there. The bad edge is one the question does not have (two thirds), or the question's
    real edge into that node, which does not start where the path is."""
    good = problem.path  # source, then the target's arm
    arms = [e for e in problem.edges if e[0] == problem.source and e[1] != good[1]]
    lines = [rng.choice(arms)]
    while nxt := [e for e in problem.edges if e[0] == lines[-1][1]]:
        lines.append(nxt[0])
    if rng.random() < 0.25:
        return "\n".join(lines) + f"\n= {lines[-1][1]}"
    k = rng.randrange(1, len(lines))  # edges kept on the wrong arm; the path stays the right length
    onto = good[k + 1]
    bad = lines[k - 1][1] + onto if rng.random() < 2 / 3 else good[k] + onto
    lines = lines[:k] + [bad] + [a + b for a, b in zip(good[k + 1:], good[k + 2:])]
    return "\n".join(lines) + f"\n= {problem.target}"
