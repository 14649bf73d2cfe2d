"""Does the self-evaluation score add to the sample's own token statistics? A probe on the testbed
(issue 16's combined scorer): a logistic model over the score's logit, mean and lowest token
log-probability, DeepConf-style lowest group confidence and log length, fitted on training
problems and judged by best-of-16 and within-prompt AUROC on the held-out ones, each feature alone
beside it. Two fits: pointwise (P(correct), what calibration gives) and pairwise (right minus
wrong samples of one prompt: the within-prompt ranking that best-of-n needs). Greedy decoding is
reported beside them.

    python bench/combined_scorer.py                       # 300 fit / 300 held-out problems, ~1 min
    python bench/combined_scorer.py --fit 40 --eval 40    # quicker

Writes bench/results/combined_scorer-<device>.json; --save writes the two-feature pairwise fit
(engine.policies.combined) beside the model's adapter, where `selfeval demo` reports it as its own
scorer beside the pure self-evaluation (never in its place).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))

import torch  # noqa: E402
from benchlib import write_results  # noqa: E402

from engine.api import Engine  # noqa: E402
from engine.policies import ConfidenceScorer  # noqa: E402
from engine.policies.combined import (  # noqa: E402
    CombinedScorer,
    features,
    fit_pairwise,
    newton_logistic,
    within_pairs,
)
from engine.sampling import SamplingParams, seeds_per_prompt  # noqa: E402
from engine.testbed import BUNDLED, task_of  # noqa: E402
from engine.testbed.demo import HELD_OUT_SEED  # noqa: E402
from engine.train.trainer import auroc  # noqa: E402

FEATURES = ("selfeval_logit", "mean_logprob", "min_logprob", "confidence", "log_length")
FIT_SEED = 7  # neither pretraining (0), adapter data (1) nor the held-out problems
COMBINATIONS = ((0, 1), (0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4), (1, 2, 3, 4), (0, 4), (0, 1, 4))


def sample_features(eng: Engine, task, seed: int, problems: int, n: int, temperature: float):
    """Features [samples, 5], right or wrong [samples], prompt index [samples]."""
    records = [p.record() for p in task.problems(problems, seed, task.DEMO_LEVELS)]
    convs = [[{"role": "user", "content": r["prompt"]}] for r in records]
    params = SamplingParams(temperature=temperature, max_tokens=task.MAX_TOKENS, n=n, score=True,
                            confidence=True, seed=0)
    outs = eng.chat(convs, seeds_per_prompt(params, len(convs)), use_tqdm=False)
    conf = ConfidenceScorer(window=8)  # the demo's
    feats, labels, groups = [], [], []
    for i, (r, o) in enumerate(zip(records, outs)):
        for s in o.samples:
            lp = s.logprobs or [0.0]
            feats.append(features(s.score, lp) + [min(lp), conf(s) if s.confidences else 0.0,
                                                  math.log(1 + len(s.token_ids))])
            labels.append(float(task.verify(r, s.text)))
            groups.append(i)
    return np.array(feats), np.array(labels), np.array(groups)


def best_of_n(score: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return float(np.mean([y[g == i][np.argmax(score[g == i])] for i in np.unique(g)]))


def auroc_within(score: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[float | None, int]:
    values = [auroc(list(score[(g == i) & (y == 1)]), list(score[(g == i) & (y == 0)])) for i in np.unique(g)]
    values = [v for v in values if v is not None]
    return (float(np.mean(values)) if values else None), len(values)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--fit", type=int, default=300, help="training problems the combination is fitted on")
    ap.add_argument("--eval", type=int, default=300, help="held-out problems (the demo's --full set)")
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--save", action="store_true",
                    help="write the pairwise self-eval + mean log-probability fit (on the --fit problems) "
                         "as the adapter's combined.json: the demo's combined scorer")
    args = ap.parse_args(argv)
    task = task_of(args.model)
    eng = Engine(args.model, device="cpu", adapter=str(Path(args.model) / "adapter"), seed=0)
    xf, yf, gf = sample_features(eng, task, FIT_SEED, args.fit, args.n, args.temperature)
    xe, ye, ge = sample_features(eng, task, HELD_OUT_SEED, args.eval, args.n, args.temperature)
    records = [p.record() for p in task.problems(args.eval, HELD_OUT_SEED, task.DEMO_LEVELS)]
    greedy = eng.chat([[{"role": "user", "content": r["prompt"]}] for r in records],
                      SamplingParams(temperature=0, max_tokens=task.MAX_TOKENS), use_tqdm=False)
    greedy_acc = float(np.mean([task.verify(r, o.samples[0].text) for r, o in zip(records, greedy)]))

    def judged(score):
        value, prompts = auroc_within(score, ye, ge)
        return {"best_of_n": best_of_n(score, ye, ge), "auroc_within": value, "prompts": prompts}

    rows = [{"scorer": name, "fit": "-", **judged(xe[:, j])} for j, name in enumerate(FEATURES)]
    for cols in COMBINATIONS:
        name = "+".join(FEATURES[c] for c in cols)
        mu, sd = xf[:, cols].mean(0), xf[:, cols].std(0) + 1e-9
        zf, ze = (xf[:, cols] - mu) / sd, (xe[:, cols] - mu) / sd
        w = newton_logistic(np.hstack([zf, np.ones((len(zf), 1))]), yf)
        rows.append({"scorer": name, "fit": "pointwise", "weights": w.round(3).tolist(),
                     **judged(np.hstack([ze, np.ones((len(ze), 1))]) @ w)})
        d = within_pairs(zf, yf, gf)
        w = newton_logistic(np.vstack([d, -d]), np.r_[np.ones(len(d)), np.zeros(len(d))])
        rows.append({"scorer": name, "fit": "pairwise", "weights": w.round(3).tolist(), **judged(ze @ w)})
    for r in rows:
        auc = "-" if r["auroc_within"] is None else f"{r['auroc_within']:.3f}"
        print(f"{r['scorer']:<60} {r['fit']:<9} best-of-{args.n} {r['best_of_n']:.3f}  AUROC within {auc}")
    baseline = next(r for r in rows if r["scorer"] == "mean_logprob")
    best = max((r for r in rows if r["fit"] != "-"), key=lambda r: r["best_of_n"])
    metrics = {
        "rows": rows,
        "oracle_best_of_n": float(np.mean([ye[ge == i].max() for i in np.unique(ge)])),
        "greedy": greedy_acc,  # the other strongest simple baseline: one greedy answer
        "fit_accuracy": float(yf.mean()), "eval_accuracy": float(ye.mean()),
        "best_combination": best["scorer"] + " (" + best["fit"] + ")",  # picked on the held-out set
        "best_combination_note": "the best of 14 fits on the held-out problems: optimistic for them",
        "best_combination_minus_mean_logprob": best["best_of_n"] - baseline["best_of_n"],
        "setup": {"model": args.model, "fit_problems": args.fit, "fit_seed": FIT_SEED,
                  "eval_problems": args.eval, "eval_seed": HELD_OUT_SEED, "n": args.n,
                  "temperature": args.temperature, "features": FEATURES},
    }
    gap = metrics["best_combination_minus_mean_logprob"]
    # chosen among 14 fits by its held-out best-of-n: an optimistic figure for the combinations
    print(f"best combination {metrics['best_combination']}: best-of-{args.n} {best['best_of_n']:.3f} vs mean "
          f"log-probability {baseline['best_of_n']:.3f} ({gap:+.3f}); "
          f"greedy {greedy_acc:.3f}; oracle {metrics['oracle_best_of_n']:.3f}")
    if args.save:
        params = fit_pairwise(xf[:, :2], yf, gf)
        params["fit"] = {"problems": args.fit, "seed": FIT_SEED, "n": args.n, "temperature": args.temperature,
                         "command": "python bench/combined_scorer.py --save"}
        saved = CombinedScorer(params).save(Path(args.model) / "adapter")
        print(f"combined scorer fitted on {args.fit} training problems -> {saved}")
    out = write_results("combined_scorer", torch.device("cpu"), metrics, args.out)
    print(f"-> {out}")
    return metrics


if __name__ == "__main__":
    main()
