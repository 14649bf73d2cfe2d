"""`selfeval demo`: the paper's results in miniature on the bundled testbed model and adapter.

On held-out problems: accuracy of greedy decoding and of one sample; best-of-{2,4,8,16} picked by
self-evaluation, by an oracle, by mean log-probability and by DeepConf-style confidence; the
adaptive curve (the Adaptive policy at several thresholds); the pruning curve (the Prune policy
dropping samples at 8/16/32 tokens on their in-place self-evaluation scores); AUROC of the score
for right vs wrong answers at the end and mid-generation. Prints a table, writes results.json and
PNG plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from engine.api import Engine
from engine.policies import Adaptive, ConfidenceScorer, Prune
from engine.sampling import SamplingParams, seeds_per_prompt
from engine.testbed import BUNDLED
from engine.testbed.task import problems, verify
from engine.train.trainer import auroc

HELD_OUT_SEED = 2024  # training streams use seeds 0 (pretraining) and 1 (adapter data)
DEMO_LEVELS = [2, 3, 4, 5]  # the levels where samples are right only part of the time
CHECKPOINTS = (8, 16, 32)
NS = (2, 4, 8, 16)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _mean_or_none(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _is_direct(sample) -> bool:
    """The reply skipped the working (the testbed's second habit, Problem.direct)."""
    return sample.text.lstrip().startswith("####")


def _argmax(values):
    """Index of the largest value (None counts as -inf; ties go to the first)."""
    return max(range(len(values)), key=lambda i: (values[i] if values[i] is not None else -math.inf, -i))


def run_demo(out_dir: str | Path, model: str | Path = BUNDLED, adapter: str | Path | None = None,
             num_problems: int = 60, temperature: float = 1.0, max_tokens: int = 64,
             thresholds=(0.5, 0.7, 0.8, 0.9, 0.95), keeps=(0.5, 0.25), seed: int = 0,
             device: str = "cpu", use_tqdm: bool = True, log=print) -> dict:
    start = time.perf_counter()
    adapter = adapter if adapter is not None else Path(model) / "adapter"
    eng = Engine(str(model), device=device, adapter=str(adapter) if Path(adapter).exists() else None,
                 seed=seed)
    records = [p.record() for p in problems(num_problems, HELD_OUT_SEED, DEMO_LEVELS)]
    convs = [[{"role": "user", "content": r["prompt"]}] for r in records]

    def bar(what: str) -> str | bool:
        return what if use_tqdm else False

    greedy = eng.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=bar("greedy"))
    greedy_acc = _mean(verify(r, o.samples[0].text) for r, o in zip(records, greedy))

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=max(NS), score=True,
                            score_at=CHECKPOINTS, confidence=True, seed=seed)
    # Seeds differ per prompt (one shared seed would correlate sample i across prompts) and repeat
    # across runs, so the policy runs below draw from the same per-prompt streams as this run.
    outs = eng.chat(convs, seeds_per_prompt(params, len(convs)), use_tqdm=bar(f"{max(NS)} samples each"))
    correct = [[verify(r, s.text) for s in o.samples] for r, o in zip(records, outs)]
    sample_acc = _mean(c for row in correct for c in row)
    conf = ConfidenceScorer(window=8)

    def pick_acc(n, value):
        return _mean(row[_argmax([value(s) for s in o.samples[:n]])] for row, o in zip(correct, outs))

    best_of_n = {}
    for n in NS:
        best_of_n[str(n)] = {
            "selfeval": pick_acc(n, lambda s: s.score),
            "oracle": _mean(max(row[:n]) for row in correct),
            "logprob": pick_acc(n, lambda s: _mean(s.logprobs) if s.logprobs else None),
            "confidence": pick_acc(n, lambda s: conf(s) if s.confidences else None),
        }
    gain = best_of_n[str(max(NS))]["selfeval"] - sample_acc

    # The model has two habits (pretrain.py): show working, or answer directly. Which one the
    # samples and the self-evaluation's picks took, and how each does.
    flat = [(s, c) for o, row in zip(outs, correct) for s, c in zip(o.samples, row)]
    is_direct = [_is_direct(s) for s, _ in flat]
    picks = [o.samples[_argmax([s.score for s in o.samples])] for o in outs]
    habits = {"direct_share": _mean(is_direct),
              "direct_acc": _mean_or_none(c for (_, c), d in zip(flat, is_direct) if d),
              "worked_acc": _mean_or_none(c for (_, c), d in zip(flat, is_direct) if not d),
              "direct_share_of_selfeval_picks": _mean(_is_direct(s) for s in picks)}

    one = seeds_per_prompt(SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed),
                           len(convs))
    adaptive = []
    for th in thresholds:
        policy = Adaptive(th, max_samples=max(NS))
        res = eng.chat(convs, one, use_tqdm=bar(f"adaptive, threshold {th}"), policy=policy)
        acc = _mean(verify(r, o.best.text) for r, o in zip(records, res))
        adaptive.append({"threshold": th, "avg_samples": _mean(len(o.samples) for o in res), "acc": acc,
                         "frac_gain": (acc - sample_acc) / gain if gain > 0 else None})

    prune = []
    full_tokens = sum(len(s.token_ids) for o in outs for s in o.samples)  # the best-of-16 run above
    for c in CHECKPOINTS:
        for keep in keeps:
            policy = Prune(max(NS), checkpoints=(c,), keep=keep)
            res = eng.chat(convs, one, use_tqdm=bar(f"prune at {c} tokens, keep {keep}"), policy=policy)
            generated = sum(o.stats.generated_tokens for o in res)
            prune.append({"checkpoint": c, "keep": keep,
                          "frac_pruned": sum(o.stats.samples_pruned for o in res) / (len(res) * max(NS)),
                          "acc": _mean(verify(r, o.best.text) for r, o in zip(records, res)),
                          "tokens_saved_frac": 1 - generated / full_tokens})

    pairs = [(s, c) for o, row in zip(outs, correct) for s, c in zip(o.samples, row)]
    roc = {"end": auroc([s.score for s, c in pairs if c], [s.score for s, c in pairs if not c])}
    for c in CHECKPOINTS:
        at = [(dict(s.checkpoint_scores).get(c), ok) for s, ok in pairs]
        known = [(v, ok) for v, ok in at if v is not None]
        roc[str(c)] = auroc([v for v, ok in known if ok], [v for v, ok in known if not ok])

    # Best-of-n needs the score to rank samples of the same prompt: the mean AUROC over prompts
    # with both right and wrong samples says whether it does (0.5: it does not).
    within = [auroc([s.score for s, c in zip(o.samples, row) if c],
                    [s.score for s, c in zip(o.samples, row) if not c]) for o, row in zip(outs, correct)]
    within = [a for a in within if a is not None]
    roc["end_within_prompt"] = _mean_or_none(within)

    results = {"greedy_acc": greedy_acc, "sample_acc": sample_acc, "best_of_n": best_of_n,
               "adaptive": adaptive, "gain_at_1_2_samples": _interp_gain(adaptive, 1.2),
               "prune": prune, "auroc": roc, "habits": habits,
               "setup": {"problems": num_problems, "temperature": temperature, "max_tokens": max_tokens,
                         "seed": seed, "levels": DEMO_LEVELS, "model": str(model), "adapter": str(adapter),
                         "seconds": round(time.perf_counter() - start, 1)}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plots(results, out)
    _print(results, log)
    return results


def _interp_gain(adaptive: list[dict], at: float) -> float | None:
    """frac_gain at `at` average samples, linear between the measured thresholds."""
    pts = sorted((a["avg_samples"], a["frac_gain"]) for a in adaptive if a["frac_gain"] is not None)
    if not pts or at < pts[0][0] or at > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return pts[0][1]


def _plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in r["best_of_n"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("selfeval", "oracle", "logprob", "confidence"):
        ax.plot(ns, [r["best_of_n"][str(n)][key] for n in ns], marker="o", label=key)
    ax.axhline(r["sample_acc"], color="gray", ls="--", label="one sample")
    ax.axhline(r["greedy_acc"], color="black", ls=":", label="greedy")
    ax.set(xscale="log", xticks=ns, xticklabels=ns, xlabel="samples (best-of-n)", ylabel="accuracy")
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "best_of_n.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = sorted((a["avg_samples"], a["acc"], a["threshold"]) for a in r["adaptive"])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="adaptive (self-eval)")
    for x, y, th in pts:
        ax.annotate(f"{th}", (x, y), textcoords="offset points", xytext=(3, 4), fontsize=6)
    ax.plot(ns, [r["best_of_n"][str(n)]["selfeval"] for n in ns], marker="s", label="best-of-n (self-eval)")
    ax.set(xlabel="average samples per prompt", ylabel="accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "adaptive.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in sorted({p["checkpoint"] for p in r["prune"]}):
        pts = sorted((p["frac_pruned"], p["acc"], p["keep"]) for p in r["prune"] if p["checkpoint"] == c)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"pruned at {c} tokens")
        for x, y, keep in pts:
            ax.annotate(f"keep {keep}", (x, y), textcoords="offset points", xytext=(3, 4), fontsize=6)
    ax.axhline(r["best_of_n"]["16"]["selfeval"], color="gray", ls="--", label="best-of-16, no pruning")
    ax.set(xlabel="fraction of samples pruned", ylabel="accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "prune.png", dpi=120)
    plt.close("all")


def _print(r: dict, log) -> None:
    log(f"greedy {r['greedy_acc']:.3f}   one sample {r['sample_acc']:.3f}")
    log("best-of-n   selfeval  oracle  logprob  confidence")
    for n, v in r["best_of_n"].items():
        log(f"  {n:>3}       {v['selfeval']:.3f}     {v['oracle']:.3f}   {v['logprob']:.3f}    "
            f"{v['confidence']:.3f}")
    log("adaptive    threshold  avg samples  acc    frac of best-of-16 gain")
    for a in r["adaptive"]:
        fg = "n/a" if a["frac_gain"] is None else f"{a['frac_gain']:.2f}"
        log(f"            {a['threshold']:<9}  {a['avg_samples']:<11.2f}  {a['acc']:.3f}  {fg}")
    g = r["gain_at_1_2_samples"]
    log(f"gain reached at 1.2 samples: {'n/a' if g is None else f'{g:.0%}'} (paper: 74%)")
    log("prune       checkpoint  pruned  acc    tokens saved")
    for p in r["prune"]:
        log(f"            {p['checkpoint']:<10}  {p['frac_pruned']:.2f}    {p['acc']:.3f}  "
            f"{p['tokens_saved_frac']:.2f}")
    h = r["habits"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    log(f"habits      answered directly {fmt(h['direct_share'])} of samples (acc {fmt(h['direct_acc'])}), "
        f"with working acc {fmt(h['worked_acc'])}; of best-of-16 self-eval picks "
        f"{fmt(h['direct_share_of_selfeval_picks'])} direct")
    log("AUROC of the self-evaluation score (right vs wrong): "
        + ", ".join(f"{k}: {'n/a' if v is None else f'{v:.3f}'}" for k, v in r["auroc"].items()))
