"""`selfeval profile`: a testbed workload run under a policy with the step profiler attached,
written as profile.json and profile.png."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from engine.api import Engine
from engine.policies import Adaptive, BestOfN, Prune
from engine.profiler import StepProfiler
from engine.sampling import SamplingParams
from engine.testbed.task import problems


def run_profile(model: str, policy_name: str, out_dir: str, num_problems: int = 32, n: int = 8,
                threshold: float = 0.8, checkpoint: int = 16, keep: float = 0.25, max_tokens: int = 64,
                device: str = "cpu", adapter: str | None = None, seed: int = 0, trace: bool = False,
                log=print) -> dict:
    """Run a testbed workload under a policy with the profiler attached; write profile.json,
    profile.png (and a torch.profiler Chrome trace with trace=True)."""
    policies = {"best-of-n": lambda: BestOfN(n), "adaptive": lambda: Adaptive(threshold, max_samples=n),
                "prune": lambda: Prune(n, checkpoints=(checkpoint,), keep=keep)}
    if policy_name not in policies:
        raise ValueError(f"policy must be one of {sorted(policies)}, not {policy_name!r}")
    adapter_dir = adapter or (str(Path(model) / "adapter") if (Path(model) / "adapter").exists() else None)
    eng = Engine(model, device=device, adapter=adapter_dir, seed=seed)
    convs = [[{"role": "user", "content": p.question}] for p in problems(num_problems, 4242)]
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)
    eng.profiler = prof = StepProfiler(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = contextlib.nullcontext()
    if trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.device(device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        ctx = torch.profiler.profile(activities=activities)
    start = time.perf_counter()
    with ctx as tp:
        outs = eng.chat(convs, params, use_tqdm=True, policy=policies[policy_name]())
    wall = time.perf_counter() - start
    if trace:
        tp.export_chrome_trace(str(out / "trace.json"))
    stats = [o.stats for o in outs]
    report = {
        "policy": policy_name, "problems": num_problems, "n": n, "wall_seconds": wall,
        **prof.summary(),
        "tokens_generated": sum(s.generated_tokens for s in stats),
        "tokens_saved": sum(s.tokens_saved for s in stats),
        "samples_drawn": sum(s.samples_drawn for s in stats),
        "samples_pruned": sum(s.samples_pruned for s in stats),
        "score_calls": sum(s.score_calls for s in stats),
        "suffix_tokens_scored": sum(s.suffix_tokens for s in stats),
        "prompt_tokens": sum(s.prompt_tokens for s in stats),
        "cached_prompt_tokens": sum(s.cached_prompt_tokens for s in stats),
        "device": device,
    }
    report["prefix_cache_hit_rate"] = report["cached_prompt_tokens"] / max(report["prompt_tokens"], 1)
    full = report["tokens_generated"] + report["tokens_saved"]
    report["saved_fraction"] = report["tokens_saved"] / full if full else 0.0
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "profile.png")
    total = report["total_seconds"] or 1.0
    log(f"policy {policy_name}: {num_problems} prompts, wall {wall:.2f}s")
    log("phase        seconds   share")
    for name, sec in sorted(report["phase_seconds"].items(), key=lambda kv: -kv[1]):
        log(f"{name:<12} {sec:8.3f}  {sec / total:6.1%}")
    for kind, v in report["forward_by_kind"].items():
        log(f"  forward in {kind} steps: {v['seconds']:.3f}s over {v['steps']} steps")
    log(f"tokens generated {report['tokens_generated']}, saved {report['tokens_saved']} "
        f"({report['saved_fraction']:.0%} of full best-of-{n}); score calls {report['score_calls']}, "
        f"suffix tokens {report['suffix_tokens_scored']}")
    log(f"prefix cache: {report['cached_prompt_tokens']} of {report['prompt_tokens']} prompt tokens "
        f"cached ({report['prefix_cache_hit_rate']:.0%})")
    return report


def _plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(report["phase_seconds"])
    a.barh(names, [report["phase_seconds"][k] for k in names])
    a.set(xlabel="seconds", title="time by phase")
    b.bar(["generated", "saved"], [report["tokens_generated"], report["tokens_saved"]])
    b.set(title=f"tokens ({report['policy']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
