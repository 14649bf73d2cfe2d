"""`selfeval profile`: policies side by side on the same prompts with the same per-sample seeds,
each on a fresh engine with the step profiler attached. Best-of-N is the baseline and always
runs first: sample i of a request draws the same random numbers under every policy, so a sample
a policy pruned would have continued exactly as the baseline's sample i did, and savings are
measured (baseline minus policy), never estimated. The policies' own online estimate
(`stats.tokens_saved`) is reported beside the measured figure.

The default workload is the bundled testbed (its verifier gives accuracy); `prompts=FILE.jsonl`
(one {"prompt": ...} per line, rendered with the chat template) runs any model, with accuracy
when a verifier `module:function(record, text) -> float` is given. Writes profile.json (every
number, per-step series included) and profile.png."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.api import Engine
from engine.policies import Adaptive, BestOfN, Prune
from engine.profiler import StepProfiler
from engine.sampling import SamplingParams, seeds_per_prompt
from engine.testbed import task_of

POLICIES = ("best-of-n", "prune", "adaptive")
BASELINE = "best-of-n"


def _policy(name: str, n: int, threshold: float, checkpoint: int, keep: float):
    return {"best-of-n": lambda: BestOfN(n), "adaptive": lambda: Adaptive(threshold, max_samples=n),
            "prune": lambda: Prune(n, checkpoints=(checkpoint,), keep=keep)}[name]


def workload(num_problems: int, prompts: str | None, verifier: str | None, model: str = "."
             ) -> tuple[list[list[dict]], list[dict], Callable | None]:
    """(conversations, records, verifier): the problems of the testbed task the model was built for
    (arith for any other model), or a prompts file's."""
    from engine.train.data import load_verifier, read_prompts

    if prompts is None:
        task = task_of(model)
        probs = task.problems(num_problems, 4242)
        records = [p.record() for p in probs]
        check = load_verifier(verifier) if verifier else task.verify
        return [[{"role": "user", "content": p.question}] for p in probs], records, check
    records = read_prompts(prompts)
    convs = [[{"role": "user", "content": r["prompt"]}] for r in records]
    return convs, records, load_verifier(verifier) if verifier else None


def run_one(name: str, make_policy, model: str, adapter: str | None, device: str, convs, records,
            check, params: SamplingParams, seed: int, trace_path: Path | None = None) -> dict:
    """One policy over the workload on a fresh engine (no prefix cache carried over)."""
    eng = Engine(model, device=device, adapter=adapter, seed=seed)
    eng.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up, not measured
    eng.profiler = prof = StepProfiler(device, eng.block_manager)
    per_prompt = seeds_per_prompt(params, len(convs))
    ctx = contextlib.nullcontext()
    if trace_path is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.device(device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        ctx = torch.profiler.profile(activities=activities)
    start = time.perf_counter()
    with ctx as tp:
        outs = eng.chat(convs, per_prompt, policy=[make_policy() for _ in convs])
    wall = time.perf_counter() - start
    if trace_path is not None:
        tp.export_chrome_trace(str(trace_path))
    stats = [o.stats for o in outs]
    summary = prof.summary()
    steps = prof.steps
    decode_steps = [s for s in steps if s.decode_tokens and not s.prefill_tokens]
    pure = [s for s in steps if s.kind == "decode"]
    suffixed = [s for s in steps if s.suffix_tokens]
    generated = sum(s.generated_tokens for s in stats)
    report = {
        "policy": name, "requests": len(convs), "wall_seconds": wall, **summary,
        "forward_seconds": sum(s.seconds for s in steps),
        "tokens_generated": generated,
        "tokens_saved_online_estimate": sum(s.tokens_saved for s in stats),
        "samples_drawn": sum(s.samples_drawn for s in stats),
        "samples_pruned": sum(s.samples_pruned for s in stats),
        "score_calls": sum(s.score_calls for s in stats),
        "scores_cached": sum(s.cached_scores for s in stats),
        "prompt_tokens": sum(s.prompt_tokens for s in stats),
        "cached_prompt_tokens": sum(s.cached_prompt_tokens for s in stats),
        "peak_kv_blocks": max((s.blocks_used for s in steps), default=0),
        "accuracy": (sum(check(r, o.text) for r, o in zip(records, outs)) / len(outs)
                     if check is not None else None),
        "scoring_cost": {
            # what a step costs when a self-evaluation suffix rides along, against pure decode
            "forward_s_per_step_with_suffix": (sum(s.seconds for s in suffixed) / len(suffixed)
                                               if suffixed else None),
            "forward_s_per_pure_decode_step": sum(s.seconds for s in pure) / len(pure) if pure else None,
            "steps_with_suffix": len(suffixed), "pure_decode_steps": len(pure),
            "forward_s_in_steps_with_suffix": sum(s.seconds for s in suffixed),
            "suffix_tokens_per_generated_token": summary["suffix_tokens"] / max(generated, 1),
            # a decode step with a suffix in it leaves the CUDA-graph path (graphs are pure decode)
            "decode_steps_off_graph_path_for_a_suffix": (
                sum(1 for s in decode_steps if s.suffix_tokens) / len(decode_steps) if decode_steps else 0.0),
        },
        "series": {"running_samples": [s.seqs for s in steps], "kv_blocks": [s.blocks_used for s in steps],
                   "forward_seconds": [s.seconds for s in steps], "kind": [s.kind for s in steps]},
    }
    report["prefix_cache_hit_rate"] = report["cached_prompt_tokens"] / max(report["prompt_tokens"], 1)
    return report


def run_profile(model: str, policies: list[str] | str, out_dir: str, num_problems: int = 32, n: int = 8,
                threshold: float = 0.8, checkpoint: int | None = None, keep: float = 0.25,
                max_tokens: int | None = None,
                device: str = "cpu", adapter: str | None = None, seed: int = 0, trace: bool = False,
                prompts: str | None = None, verifier: str | None = None, ignore_eos: bool = False,
                temperature: float = 1.0, log=print) -> dict:
    """Run the baseline and each policy; write profile.json and profile.png (and a Chrome trace
    per policy with trace=True); return the report. checkpoint and max_tokens default to the
    testbed task's (its middle checkpoint and its MAX_TOKENS: 3 and 16 on edges, 16 and 64 on
    arith) with testbed prompts, to 16 and 64 with a prompts file."""
    policies = [policies] if isinstance(policies, str) else list(policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"policies must be among {list(POLICIES)}, not {unknown or policies}")
    names = [BASELINE] + [p for p in dict.fromkeys(policies) if p != BASELINE]
    adapter = adapter or (str(Path(model) / "adapter") if (Path(model) / "adapter").exists() else None)
    convs, records, check = workload(num_problems, prompts, verifier, model)
    task = task_of(model) if prompts is None else None
    if checkpoint is None:
        checkpoint = task.CHECKPOINTS[len(task.CHECKPOINTS) // 2] if task else 16
    if max_tokens is None:
        max_tokens = task.MAX_TOKENS if task else 64
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, ignore_eos=ignore_eos)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in names:
        trace_path = out / f"trace-{name}.json" if trace else None
        runs[name] = run_one(name, _policy(name, n, threshold, checkpoint, keep), model, adapter, device,
                             convs, records, check, params, seed, trace_path)
    base = runs[BASELINE]
    for r in runs.values():
        r["vs_baseline"] = {
            "tokens_saved": base["tokens_generated"] - r["tokens_generated"],
            "tokens_saved_fraction": 1 - r["tokens_generated"] / max(base["tokens_generated"], 1),
            "forward_seconds_saved": base["forward_seconds"] - r["forward_seconds"],
            "wall_seconds_saved": base["wall_seconds"] - r["wall_seconds"],
            "wall_fraction": r["wall_seconds"] / base["wall_seconds"],
            "steps_saved": base["steps"] - r["steps"],
            "peak_kv_blocks_saved": base["peak_kv_blocks"] - r["peak_kv_blocks"],
            "accuracy_change": (r["accuracy"] - base["accuracy"] if r["accuracy"] is not None else None),
        }
    report = {"model": model, "adapter": adapter, "device": device, "requests": len(convs),
              "prompts": prompts or "testbed", "n": n, "max_tokens": max_tokens, "temperature": temperature,
              "ignore_eos": ignore_eos, "seed": seed, "baseline": BASELINE,
              "settings": {"prune": {"checkpoint": checkpoint, "keep": keep},
                           "adaptive": {"threshold": threshold, "max_samples": n}},
              "policies": runs}
    (out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(report, out / "profile.png")
    _log(report, log)
    return report


def _log(report: dict, log) -> None:
    runs = report["policies"]
    log(f"{report['requests']} prompts ({report['prompts']}), n={report['n']}, max_tokens "
        f"{report['max_tokens']}, T={report['temperature']}; baseline {report['baseline']} "
        f"(same prompts, same per-sample seeds)")
    head = (f"{'policy':<10} {'tokens':>7} {'saved':>7} {'(est.)':>7} {'wall s':>7} {'fwd s':>7} "
            f"{'steps':>6} {'peak KV':>7} {'accuracy':>8}")
    log(head)
    for name, r in runs.items():
        d = r["vs_baseline"]
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        log(f"{name:<10} {r['tokens_generated']:>7} {d['tokens_saved']:>7} "
            f"{r['tokens_saved_online_estimate']:>7} {r['wall_seconds']:>7.2f} {r['forward_seconds']:>7.2f} "
            f"{r['steps']:>6} {r['peak_kv_blocks']:>7} {acc:>8}")
    for name, r in runs.items():
        c = r["scoring_cost"]
        if c["steps_with_suffix"]:
            with_s = c["forward_s_per_step_with_suffix"] * 1e3
            pure = c["forward_s_per_pure_decode_step"]
            log(f"{name}: {c['steps_with_suffix']} steps carried a suffix, {with_s:.1f} ms forward each vs "
                f"{pure * 1e3 if pure else float('nan'):.1f} ms a pure decode step; "
                f"{c['suffix_tokens_per_generated_token']:.2f} suffix tokens per generated token; "
                f"{c['decode_steps_off_graph_path_for_a_suffix']:.0%} of decode steps left the graph path")


def _plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["policies"]
    names = list(runs)
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 7.5))
    phases = sorted({p for r in runs.values() for p in r["phase_seconds"]},
                    key=lambda p: -sum(r["phase_seconds"].get(p, 0) for r in runs.values()))
    left = [0.0] * len(names)
    for p in phases:
        widths = [runs[nm]["phase_seconds"].get(p, 0.0) for nm in names]
        a.barh(names, widths, left=left, label=p)
        left = [x + w for x, w in zip(left, widths)]
    a.set(xlabel="seconds", title="time by phase")
    a.invert_yaxis()
    a.legend(fontsize=7, ncol=2)
    others = [nm for nm in names if nm != report["baseline"]]
    x = range(len(others))
    b.bar([i - 0.2 for i in x], [runs[nm]["vs_baseline"]["tokens_saved_fraction"] * 100 for nm in others],
          width=0.4, label="tokens")
    b.bar([i + 0.2 for i in x], [(1 - runs[nm]["vs_baseline"]["wall_fraction"]) * 100 for nm in others],
          width=0.4, label="wall time")
    b.set_xticks(list(x), others)
    b.axhline(0, color="black", linewidth=0.5)
    b.set(ylabel=f"% saved vs {report['baseline']}", title="measured savings (same seeds)")
    b.legend(fontsize=8)
    for nm in names:
        t = 0.0
        times = []
        for s in runs[nm]["series"]["forward_seconds"]:
            t += s
            times.append(t)
        c.plot(times, runs[nm]["series"]["running_samples"], label=nm, linewidth=1)
    c.set(xlabel="forward seconds into the run", ylabel="sequences in the step", title="batch occupancy")
    c.legend(fontsize=8)
    if all(runs[nm]["accuracy"] is not None for nm in names):
        for nm in names:
            d.scatter(runs[nm]["tokens_generated"], runs[nm]["accuracy"], label=nm)
            d.annotate(nm, (runs[nm]["tokens_generated"], runs[nm]["accuracy"]), fontsize=8)
        d.set(xlabel="tokens generated", ylabel="accuracy", title="accuracy against compute")
    else:
        for nm in names:
            d.scatter(runs[nm]["tokens_generated"], runs[nm]["wall_seconds"], label=nm)
            d.annotate(nm, (runs[nm]["tokens_generated"], runs[nm]["wall_seconds"]), fontsize=8)
        d.set(xlabel="tokens generated", ylabel="wall seconds", title="time against compute (no verifier)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
