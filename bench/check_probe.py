"""Can a testbed model check paths before any adapter? The edges task's checking skill (taught in
pretraining, engine.testbed.pretrain: a path, one of the 8 CHECK_QUESTIONS, "right" or "wrong"),
read as the first verdict token's logit difference on held-out synthetic paths, at the levels the
demo runs. What the self-evaluation adapter can build on, per case:

- whole paths: the right one against a wrong attempt (another arm followed to its end);
- paths cut short after k edges (edges.partial, the question asked mid-way): the right path's
  first k edges against another arm's (it shows its mistake only further on: length - k hops of
  lookahead) and against a path whose k-th edge the question lacks (a slip, visible where made).

On the avoid task (engine.testbed.avoid) "another arm" is a wrong arm through the avoided node,
and a cut-short one is cut at or after its edge into it: the mistake is in view, no lookahead.

AUROC of right over wrong per (level, k) and overall; 0.5 is chance. Pruning mid-generation needs
the cut-short cases, whole-path checks are what best-of-n uses.

    python bench/check_probe.py [--model DIR] [--problems 60] [--levels 1,3,6]

Writes bench/results/check_probe-<device>.json (--out elsewhere).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))

import torch  # noqa: E402
from benchlib import print_table, write_results  # noqa: E402

from engine.testbed import BUNDLED, task_of  # noqa: E402
from engine.testbed.pretrain import CHECK_QUESTIONS, _chat_ids  # noqa: E402
from engine.train.trainer import auroc  # noqa: E402

PROBE_SEED = 99  # neither pretraining (0), adapter data (1), the combined fit (7) nor the demo


def verdicts(model, tokenizer, question: str, answers: list[str], checks: list[str]) -> list[float]:
    """logit("right") - logit("wrong") of the verdict's first token, one answer at a time."""
    right, wrong = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("right", "wrong"))
    out = []
    for answer, check in zip(answers, checks):
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": check}]
        with torch.no_grad():
            logits = model(torch.tensor([_chat_ids(tokenizer, turns, True)])).logits[0, -1]
        out.append((logits[right] - logits[wrong]).item())
    return out


def probe(model_dir: str, problems: int, seed: int = PROBE_SEED, levels: list[int] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from engine.model.loader import load_tokenizer

    task = task_of(model_dir)
    if not hasattr(task, "partial"):
        raise SystemExit(f"the {task.NAME} task has no partial paths to probe")
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    levels = levels if levels is not None else task.DEMO_LEVELS
    rng = random.Random(seed)
    cells: dict[tuple, dict[str, list[float]]] = {}
    for p in task.problems(problems, seed, levels):
        wrong_arm = task.attempt(rng, p)
        answers = {("whole", "right"): p.solution, ("whole", "arm"): wrong_arm}
        for right in (True, False):
            cut = task.partial(rng, p, right)
            kind = "right" if right else ("arm" if cut.split("\n")[-1].split()[0] in p.edges else "made up")
            answers[(len(cut.split("\n")), kind)] = cut
        checks = [CHECK_QUESTIONS[rng.randrange(len(CHECK_QUESTIONS))] for _ in answers]
        scores = verdicts(model, tokenizer, p.question, list(answers.values()), checks)
        for (k, kind), v in zip(answers, scores):
            cells.setdefault((p.level, k), {}).setdefault(kind, []).append(v)
    rows = []
    for (level, k), c in sorted(cells.items(), key=lambda x: (x[0][0], str(x[0][1]))):
        shape = task.LEVELS[level]  # edges: (arms, length); avoid: (arms, depth of the avoided node, length)
        arms, length, lookahead = shape[0], shape[-1], len(shape) == 2
        rows.append({"level": level, "arms": arms, "length": length, "cut": k,
                     # edges: hops from the cut to the wrong arm's end (avoid: its mistake is in the cut)
                     "hops_left": (0 if k == "whole" else length - k) if lookahead else None,
                     **({} if lookahead else {"depth": shape[1]}),
                     "auroc_vs_arm": auroc(c.get("right", []), c.get("arm", [])),
                     "auroc_vs_made_up": auroc(c.get("right", []), c.get("made up", [])),
                     "right": len(c.get("right", [])), "arm": len(c.get("arm", [])),
                     "made_up": len(c.get("made up", []))})

    def pooled(cut: bool, kind: str) -> float | None:
        pick = [c for (_, k), c in cells.items() if (k != "whole") == cut]
        right = [v for c in pick for v in c.get("right", [])]
        return auroc(right, [v for c in pick for v in c.get(kind, [])])

    # Whether the verdict reads the path at all: its spread over whole paths (a verdict that ignores
    # the path gives one constant, whatever its AUROC rounds to).
    whole = {kind: torch.tensor([v for (_, k), c in cells.items() if k == "whole" for v in c.get(kind, [])])
             for kind in ("right", "arm")}
    return {"model": str(model_dir), "task": task.NAME, "problems": problems, "seed": seed,
            "levels": levels, "rows": rows,
            "whole_vs_arm": pooled(False, "arm"), "cut_vs_arm": pooled(True, "arm"),
            "cut_vs_made_up": pooled(True, "made up"),
            "whole_verdict_mean": {kind: v.mean().item() for kind, v in whole.items()},
            "whole_verdict_sd": torch.cat(list(whole.values())).std().item()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--levels", default=None, help="comma-separated (default: the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(lv) for lv in args.levels.split(",")] if args.levels else None
    r = probe(args.model, args.problems, levels=levels)
    print_table(r["rows"], ["level", "arms", "length", "cut", "hops_left", "auroc_vs_arm", "auroc_vs_made_up",
                            "right", "arm", "made_up"])
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"whole paths, right vs another arm: {fmt(r['whole_vs_arm'])}; cut short, right vs another arm: "
          f"{fmt(r['cut_vs_arm'])}, right vs a made-up edge: {fmt(r['cut_vs_made_up'])}")
    mean = r["whole_verdict_mean"]
    print(f"verdict on whole paths (logit right - wrong): mean {mean['right']:+.3f} right, "
          f"{mean['arm']:+.3f} another arm; standard deviation {r['whole_verdict_sd']:.3f}")
    write_results("check_probe", torch.device("cpu"), r, args.out)
    return r


if __name__ == "__main__":
    main()
