"""A second testbed task (`python -m engine.testbed.build --task paths`): find a path in a small
graph listed in the question (a "path-star" graph), easy to hard:

    Q: path from H to Q: KQ HD DW HK WM        (user; "KQ" is the edge K->Q; shuffled)
    HK                                         (assistant: one edge per line)
    KQ

The source has `arms` out-edges, each starting a chain of `length` nodes; the target is the end of
one chain. Producing a path needs lookahead (which arm leads to the target: follow the edges back
from the target, length-1 hops); checking one is a lookup per line (is this edge in the question?
does the last line end at the target?). A model trained on correct paths only follows an arm
confidently once it has picked it, so a wrong sample is as likely, token by token, as a right one:
mean log-probability cannot tell them apart, the end of the response can.

Nodes are capital letters; a tokenizer for this task must give each its own token."""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

NAME = "paths"
LEVELS = [(2, 2), (3, 2), (2, 3), (3, 3), (2, 4), (3, 4)]  # (arms, nodes per arm)
DEMO_LEVELS = [0, 1, 2, 3, 4, 5]
DATA_LEVELS = [0, 1, 2, 3, 4, 5]
# A line is 3 tokens ("HK" and a newline): checkpoints right after the 1st, 2nd and 3rd edge.
CHECKPOINTS = (2, 5, 8)
DATA_CHECKPOINTS = (2, 5, 8)
MAX_TOKENS = 32
SPLIT_LETTERS = True  # every capital letter its own token
NODES = string.ascii_uppercase
_EDGE = re.compile(r"^([A-Z])([A-Z])$")
_FINAL = re.compile(r"^= ([A-Z])$")
_QUESTION = re.compile(r"^Q: path from ([A-Z]) to ([A-Z]): ((?:[A-Z][A-Z] ?)+)$")


@dataclass(frozen=True)
class Problem:
    source: str
    target: str
    edges: tuple[str, ...]  # "AB" (A->B), in the order the question lists them
    path: tuple[str, ...]  # the right path, source to target
    level: int
    final: bool = False  # the answer ends with a line naming the node reached ("= D"; edges)

    @property
    def question(self) -> str:
        return f"Q: path from {self.source} to {self.target}: " + " ".join(self.edges)

    @property
    def solution(self) -> str:
        lines = "\n".join(f"{a}{b}" for a, b in zip(self.path, self.path[1:]))
        return lines + f"\n= {self.path[-1]}" if self.final else lines

    @property
    def answer(self) -> str:
        return " ".join(self.path)

    def record(self) -> dict:
        return {"prompt": self.question, "answer": self.answer, "level": self.level}


def make_problem(rng: random.Random, level: int, alphabet: str = NODES, final: bool = False,
                 table: list[tuple[int, int]] = LEVELS) -> Problem:
    """A problem of shape table[level] (arms, nodes per arm)."""
    arms, length = table[level]
    nodes = rng.sample(alphabet, 1 + arms * length)
    source, chains = nodes[0], [nodes[1 + i * length: 1 + (i + 1) * length] for i in range(arms)]
    edges = [f"{source}{c[0]}" for c in chains]
    edges += [f"{a}{b}" for c in chains for a, b in zip(c, c[1:])]
    rng.shuffle(edges)
    good = chains[0]  # nodes are random, so which arm is the target's carries no hint
    return Problem(source, good[-1], tuple(edges), (source, *good), level, final)


def problems(n: int, seed: int, levels: list[int] | None = None, alphabet: str = NODES,
             final: bool = False, table: list[tuple[int, int]] = LEVELS) -> list[Problem]:
    """n problems, levels cycled evenly (all of table's by default)."""
    rng = random.Random(seed)
    levels = levels if levels is not None else list(range(len(table)))
    return [make_problem(rng, levels[i % len(levels)], alphabet, final, table) for i in range(n)]


def check(prompt: str, text: str, final: bool = False) -> tuple[bool, int]:
    """(right, number of leading lines that are edges of the question continuing the path). With
    final, the answer's last line must name the node the path reached ("= D")."""
    found = _QUESTION.match(prompt.strip())
    if not found:
        raise ValueError(f"not a path question: {prompt!r}")
    source, target, edges = found.group(1), found.group(2), set(found.group(3).split())
    at, good = source, 0
    lines = text.strip().split("\n")
    if final:
        named = _FINAL.match(lines[-1].strip())
        if not named:
            return False, check(prompt, text)[1]
        lines, named = lines[:-1], named.group(1)
        ok, good = check(prompt, "\n".join(lines))
        return ok and named == target, good
    for line in lines:
        m = _EDGE.match(line.strip())
        if not m or m.group(1) != at or line.strip() not in edges:
            return False, good
        at, good = m.group(2), good + 1
    return at == target and good == len(lines), good


def verify(record: dict, text: str) -> float:
    """1.0 when every line is an edge of the question, each starting where the last ended, from
    the source to the target; else 0.0."""
    return float(check(record["prompt"], text)[0])


def attempt(rng: random.Random, problem: Problem) -> str:
    """A wrong attempt as a solver that guesses the arm writes it: another arm, followed by the
    question's own edges to its end (short of the target). Pretraining text holds some of these
    (PretrainConfig.attempt_frac), so the model learns that a path follows the question's edges
    even when it took the wrong arm, instead of making up an edge onto the target's arm."""
    arms = [e for e in problem.edges if e[0] == problem.source and e[1] != problem.path[1]]
    lines = [rng.choice(arms)]
    while nxt := [e for e in problem.edges if e[0] == lines[-1][1]]:
        lines.append(nxt[0])
    return "\n".join(lines)


def corrupt(rng: random.Random, problem: Problem) -> str:
    """A wrong path as a sampling model writes one: down another arm to its end, and half the time
    a last edge that is not in the question, to the target."""
    wrong = [e for e in problem.edges if e[0] == problem.source and e != problem.path[0] + problem.path[1]]
    lines = [rng.choice(wrong)]
    while nxt := [e for e in problem.edges if e[0] == lines[-1][1]]:
        lines.append(nxt[0])
    if rng.random() < 0.5:
        lines[-1] = lines[-1][0] + problem.target
    return "\n".join(lines)
