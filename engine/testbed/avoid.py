"""The avoid task (`--task avoid`): a path in a small graph that must not pass one node, one token
per edge as in engine.testbed.edges (its NODES, EDGE_TOKENS and tokenizer), each line writing the
node it reaches after the edge:

    Q: path from D to L avoiding B: KF IL DK FH BI OB DN HL NB DO   (user; edges shuffled)
    DK K                                                           (assistant: one edge per line
    KF F                                                            and the node it reaches,
    FH H                                                            then the node the path ends at)
    HL L
    = L

Every arm out of the source reaches the target, but all arms but one run into the avoided node
(at the same depth, then share one tail to the target), so every path has the same length.
Choosing the one clean arm needs lookahead (which first node leads into the avoided node), as on
`edges`; the easy level (0) puts the avoided node right after the source, where no lookahead is
needed. What differs from `edges` is where a wrong sample shows its mistake: at the edge into the
avoided node, edge 1-3 of 4-5, rather than at its end. A sample that took a wrong arm then follows
the question's own edges to the target as fluently as a right one, so mean log-probability cannot
see it; a mid-generation check after the mistake could, and the node written on each line makes
that check one token ("B" on a line) matching one token of the question ("avoiding B").

Measured (bench/README.md; bench/results/testbed-edges-cpu.json): with the edge alone on each line
(runs avoid1-2, commit 09fbc0e), 5,500 steps of pretraining left the model's check at chance even on
whole paths: it did not find the line whose edge token enters the avoided node. With the node
written (runs avoid3-5), 5,000 more steps did not either, nor did a fresh model trained on the check
alone, so no model of this task is bundled."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from engine.testbed.edges import EDGE_TOKENS, NODES  # noqa: F401  (the task's names: one token per edge)

NAME = "avoid"
# (arms, depth of the avoided node on the wrong arms, nodes between source and target)
LEVELS = [(2, 1, 3), (3, 2, 3), (4, 2, 3), (5, 2, 3), (3, 3, 4), (4, 3, 4)]
DEMO_LEVELS = [0, 1, 2, 3, 4, 5]
DATA_LEVELS = [0, 1, 2, 3, 4, 5]
# A line is 3 tokens (edge, node, newline): checkpoints right after the 1st, 2nd and 3rd line (paths
# are 4-5 edges).
CHECKPOINTS = (2, 5, 8)
DATA_CHECKPOINTS = (2, 5, 8)
MAX_TOKENS = 20
SPLIT_LETTERS = False
_QUESTION = re.compile(r"^Q: path from ([A-Z]) to ([A-Z]) avoiding ([A-Z]): ((?:[A-Z][A-Z] ?)+)$")
_LINE = re.compile(r"^([A-Z])([A-Z]) ([A-Z])$")  # "DK K": the edge, then the node it reaches
_FINAL = re.compile(r"^= ([A-Z])$")


@dataclass(frozen=True)
class Problem:
    source: str
    target: str
    avoid: str
    edges: tuple[str, ...]  # "AB" (A->B), in the order the question lists them
    path: tuple[str, ...]  # the right path, source to target
    wrong_first: tuple[str, ...]  # the first nodes of the arms that run into `avoid`
    level: int

    @property
    def question(self) -> str:
        return f"Q: path from {self.source} to {self.target} avoiding {self.avoid}: " + " ".join(self.edges)

    @property
    def path_edges(self) -> list[str]:
        """The right path's edges, source to target ("DK", "KF", ...)."""
        return [a + b for a, b in zip(self.path, self.path[1:])]

    @property
    def solution(self) -> str:
        return "\n".join(lines(self.path_edges)) + f"\n= {self.target}"

    @property
    def answer(self) -> str:
        return " ".join(self.path)

    def record(self) -> dict:
        return {"prompt": self.question, "answer": self.answer, "level": self.level}


def lines(edges: list[str]) -> list[str]:
    """An answer's lines for a path's edges: each edge, then the node it reaches ("DK" -> "DK K")."""
    return [f"{e} {e[1]}" for e in edges]


def make_problem(rng: random.Random, level: int) -> Problem:
    arms, depth, length = LEVELS[level]
    wrong_arms = arms - 1
    nodes = rng.sample(NODES, 2 + length + wrong_arms * (depth - 1) + 1 + (length - depth))
    source, target, avoid = nodes[0], nodes[1], nodes[2]
    rest = nodes[3:]
    good, rest = rest[:length], rest[length:]
    tail, rest = rest[:length - depth], rest[length - depth:]  # after the avoided node
    heads = [rest[i * (depth - 1):(i + 1) * (depth - 1)] for i in range(wrong_arms)]
    path = (source, *good, target)
    edges = [a + b for a, b in zip(path, path[1:])]
    for head in heads:
        chain = [source, *head, avoid]
        edges += [a + b for a, b in zip(chain, chain[1:])]
    chain = [avoid, *tail, target]
    edges += [a + b for a, b in zip(chain, chain[1:])]
    edges = list(dict.fromkeys(edges))  # depth 1: every wrong arm is the one edge source -> avoid
    rng.shuffle(edges)
    firsts = tuple(dict.fromkeys(h[0] if h else avoid for h in heads))
    return Problem(source, target, avoid, tuple(edges), path, firsts, level)


def problems(n: int, seed: int, levels: list[int] | None = None) -> list[Problem]:
    """n problems, levels cycled evenly (all levels by default)."""
    rng = random.Random(seed)
    levels = levels if levels is not None else list(range(len(LEVELS)))
    return [make_problem(rng, levels[i % len(levels)]) for i in range(n)]


def check(prompt: str, text: str) -> tuple[bool, int]:
    """(right, number of leading lines that are an edge of the question continuing the path, not
    entering the avoided node, and naming the node it reaches). Right: such lines from the source to
    the target, then "= target"."""
    found = _QUESTION.match(prompt.strip())
    if not found:
        raise ValueError(f"not an avoid question: {prompt!r}")
    source, target, avoid = found.group(1), found.group(2), found.group(3)
    edges = set(found.group(4).split())
    rows = [" ".join(line.split()) for line in text.strip().split("\n")]
    at, good = source, 0
    for row in rows:
        m = _LINE.match(row)
        if (not m or m.group(1) != at or m.group(1) + m.group(2) not in edges or m.group(2) == avoid
                or m.group(3) != m.group(2)):
            break
        at, good = m.group(2), good + 1
    named = _FINAL.match(rows[-1])
    right = good == len(rows) - 1 and at == target and named is not None and named.group(1) == target
    return right, good


def verify(record: dict, text: str) -> float:
    """1.0 for a path of the question's edges from the source to the target that never enters the
    avoided node, each line naming the node it reaches and the last the target; else 0.0."""
    return float(check(record["prompt"], text)[0])


def _wrong_path(rng: random.Random, problem: Problem) -> list[str]:
    """The edges of a path down a wrong arm: the question's own edges, through the avoided node."""
    at, path = problem.source, []
    first = rng.choice(problem.wrong_first)
    path.append(at + first)
    at = first
    while at != problem.target:
        nxt = next(e for e in problem.edges if e[0] == at)
        path.append(nxt)
        at = nxt[1]
    return path


def attempt(rng: random.Random, problem: Problem) -> str:
    """A wrong attempt as a solver that guesses the arm writes it: a wrong arm, the question's own
    edges through the avoided node to the target, named. Only the edge into the avoided node is
    wrong."""
    return "\n".join(lines(_wrong_path(rng, problem))) + f"\n= {problem.target}"


def corrupt(rng: random.Random, problem: Problem) -> str:
    """attempt's wrong paths, or (a third of the time) the right path with one edge made up (not in
    the question) from where the path is, then on to the target as the made-up node allows: the
    slips a sampling model makes beside wrong arms."""
    if rng.random() >= 1 / 3:
        return attempt(rng, problem)
    good = problem.path_edges
    k = rng.randrange(len(good) - 1)
    at = problem.path[k]
    made_up = [at + b for b in NODES if b not in (at, problem.avoid) and at + b not in problem.edges]
    return "\n".join(lines(good[:k] + [rng.choice(made_up)] + good[k + 1:])) + f"\n= {problem.target}"


def partial(rng: random.Random, problem: Problem, right: bool) -> str:
    """A path cut short for the checking task asked mid-way (PretrainConfig.partial_frac): the right
    path's first k lines when right; else a wrong arm's first k lines, cut at or after its edge into
    the avoided node (the mistake is in view: a cut before it would ask for lookahead)."""
    good = problem.path_edges
    if right:
        return "\n".join(lines(good[:rng.randrange(1, len(good))]))
    path = _wrong_path(rng, problem)
    into = next(i for i, e in enumerate(path) if e[1] == problem.avoid)
    return "\n".join(lines(path[:rng.randrange(into + 1, len(path))]))
