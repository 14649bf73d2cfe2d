"""Chained addition and subtraction with written steps, easy to hard:

    Q: 347+86-59 = ?          (user)
    347+86 = 433              (assistant: one line per step)
    433-59 = 374
    #### 374

Difficulty grows with the number of terms (2-4) and their digits (1-3). A small model gets the
easy ones and stumbles on carries, so sampled answers are right only part of the time. A reply may
also skip the working and give only `#### 374` (Problem.direct), which works on easy problems."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAME = "arith"
LEVELS = [(2, 1), (2, 2), (3, 2), (2, 3), (3, 3), (4, 3)]  # (terms, max digits)
DEMO_LEVELS = [2, 3, 4, 5]  # the levels where samples are right only part of the time
DATA_LEVELS = [1, 2, 3, 4, 5]  # level 0 is always solved: it teaches the adapter nothing
CHECKPOINTS = (8, 16, 32)  # generated tokens at which the demo scores mid-generation
DATA_CHECKPOINTS = (8, 16)  # and the adapter data's mid-generation examples
MAX_TOKENS = 64
SPLIT_LETTERS = False  # the tokenizer keeps words whole (digits are always split)
_ANSWER = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    ops: tuple[str, ...]  # between consecutive terms
    level: int

    @property
    def question(self) -> str:
        expr = str(self.terms[0]) + "".join(op + str(t) for op, t in zip(self.ops, self.terms[1:]))
        return f"Q: {expr} = ?"

    def steps(self) -> list[tuple[int, str, int, int]]:
        acc, out = self.terms[0], []
        for op, t in zip(self.ops, self.terms[1:]):
            new = acc + t if op == "+" else acc - t
            out.append((acc, op, t, new))
            acc = new
        return out

    @property
    def direct(self) -> str:
        """The answer with no working, the habit that fails on long problems."""
        return f"#### {self.answer}"

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def solution(self) -> str:
        lines = [f"{a}{op}{t} = {r}" for a, op, t, r in self.steps()]
        return "\n".join(lines) + f"\n#### {self.answer}"

    def record(self) -> dict:
        return {"prompt": self.question, "answer": self.answer, "level": self.level}


def make_problem(rng: random.Random, level: int) -> Problem:
    n_terms, digits = LEVELS[level]
    terms = [rng.randrange(1, 10 ** rng.randint(1, digits)) for _ in range(n_terms)]
    terms[0] = rng.randrange(10 ** (digits - 1), 10**digits)  # the first term has the full width
    ops = tuple(rng.choice("+-") for _ in range(n_terms - 1))
    return Problem(tuple(terms), ops, level)


def problems(n: int, seed: int, levels: list[int] | None = None) -> list[Problem]:
    """n problems, levels cycled evenly (all levels by default)."""
    rng = random.Random(seed)
    levels = levels if levels is not None else list(range(len(LEVELS)))
    return [make_problem(rng, levels[i % len(levels)]) for i in range(n)]


def is_direct(text: str) -> bool:
    """The reply skipped the working (the second habit, Problem.direct)."""
    return text.lstrip().startswith("####")


def extract_answer(text: str) -> int | None:
    found = _ANSWER.search(text)
    return int(found.group(1)) if found else None


def verify(record: dict, text: str) -> float:
    """1.0 when the response's final '#### N' equals the record's answer, else 0.0."""
    return float(extract_answer(text) == int(record["answer"]))


def corrupt(rng: random.Random, problem: Problem) -> str:
    """The solution with one step's result off by a small digit error and the rest of the chain
    carried on from the wrong value, like a sampling slip."""
    steps = problem.steps()
    bad = rng.randrange(len(steps))
    lines, acc = [], None
    for i, (a, op, t, r) in enumerate(steps):
        a = a if acc is None else acc
        r = a + t if op == "+" else a - t
        if i == bad:
            r += rng.choice([-1, 1]) * 10 ** rng.randrange(max(1, len(str(abs(r))) if r else 1))
        lines.append(f"{a}{op}{t} = {r}")
        acc = r
    return "\n".join(lines) + f"\n#### {acc}"
