"""Async scheduling (EngineConfig.async_scheduling) against the synchronous step loop, on one
engine in one run: decode steps per second at batch 1, 64 and 256 (streaming deltas, sampled at
T=1.0 with per-request seeds), the device's idle share between decode steps from a torch profiler
trace (CUDA), and both modes' tokens checked equal.

On a GPU (the Llama-3.1-8B shape, random bf16 weights, CUDA graphs) the synchronous loop leaves
the device idle while the host applies a step and schedules the next; running ahead hides that.
On a CPU nothing overlaps (the forward runs on the calling thread), so there the figure is the
cost of running ahead (the tiny model makes the forward nearly free, so host time dominates).

    python bench/async_scheduling.py [--device cpu|cuda] [--steps 64] [--batches 1,64,256]

Writes bench/results/async_scheduling-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import print_table, write_results  # noqa: E402
from host_overhead import host_bench_model  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402

WARMUP = 4  # decode steps before timing (graphs and kernels settled)


def device_idle_share(prof) -> tuple[float, float]:
    """(idle share, window ms) of the device between its first and last activity in a trace: one
    minus the union of its kernel and copy intervals over that window."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return float("nan"), 0.0
    busy, (lo, hi) = 0.0, spans[0]
    start = lo
    for a, b in spans[1:]:
        if a > hi:
            busy += hi - lo
            lo, hi = a, b
        else:
            hi = max(hi, b)
    busy += hi - lo
    window = hi - start
    return 1.0 - busy / window, window / 1e3


def run_mode(eng: Engine, batch: int, steps: int, prompt_len: int, async_on: bool, trace_steps: int,
             device: str) -> tuple[dict, list[list[int]]]:
    core = eng.core
    core.async_scheduling = async_on
    params = [SamplingParams(temperature=1.0, max_tokens=WARMUP + steps + trace_steps + 8, ignore_eos=True,
                             seed=i) for i in range(batch)]
    ids = [eng.add_request([5 + (7 * i + j) % 200 for j in range(prompt_len)], p)
           for i, p in enumerate(params)]
    tokens = {i: [] for i in ids}

    def step() -> None:
        for d in eng.step_deltas():
            tokens[d.request_id] += d.samples[0].token_ids if d.samples else []

    scheduler = core.scheduler
    while scheduler.waiting or any(s.num_generated == 0 for s in scheduler.running):
        step()  # prefill
    for _ in range(WARMUP):
        step()
    ahead_before = core.ahead_steps
    gc.collect()
    gc.freeze()
    walls = []
    if device == "cuda":
        torch.cuda.synchronize()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    if device == "cuda":
        torch.cuda.synchronize()
    total = sum(walls)
    row = {"batch": batch, "mode": "async" if async_on else "sync", "steps": steps,
           "step_ms": statistics.median(walls) * 1e3, "mean_step_ms": total / steps * 1e3,
           "tokens_per_s": batch * steps / total, "ran_ahead": core.ahead_steps - ahead_before}
    if device == "cuda" and trace_steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(trace_steps):
                step()
            torch.cuda.synchronize()
        row["device_idle_share"], row["trace_ms"] = device_idle_share(prof)
    gc.unfreeze()
    for i in ids:
        eng.abort(i)
    core.async_scheduling = False
    eng.step_deltas()  # a step still in flight is applied to nothing (its requests are gone)
    assert eng.num_free_blocks == core.block_manager.num_blocks, "blocks did not return"
    return row, [tokens[i] for i in ids]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--trace-steps", type=int, default=16, help="decode steps in the profiler trace (CUDA)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a checkpoint (default: tiny on CPU, 8B shape on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    trace = args.trace_steps if args.device == "cuda" else 0
    with tempfile.TemporaryDirectory() as tmp:
        path, load_format, label = host_bench_model(args.model, args.device, Path(tmp))
        longest = args.prompt_len + WARMUP + args.steps + trace + 16
        eng = Engine(path, device=args.device, block_size=16, max_num_seqs=max(batches),
                     max_batch_tokens=max(2048, max(batches) * args.prompt_len), load_format=load_format,
                     num_blocks=max(batches) * -(-longest // 16) + 64)
        rows, equal = [], True
        for batch in batches:
            # Alternate the modes twice so drift (clocks, a busy neighbour) hits both alike.
            got = {}
            for async_on in (False, True, False, True):
                row, tokens = run_mode(eng, batch, args.steps, args.prompt_len, async_on, trace, args.device)
                rows.append(row)
                if async_on in got:
                    equal &= got[async_on] == tokens
                got[async_on] = tokens
            equal &= got[False] == got[True]
    summary = []
    for batch in batches:
        mine = {m: [r for r in rows if r["batch"] == batch and r["mode"] == m] for m in ("sync", "async")}
        s = {"batch": batch}
        for m, rs in mine.items():
            s[f"{m}_step_ms"] = min(r["step_ms"] for r in rs)
            if trace:
                s[f"{m}_device_idle"] = min(r["device_idle_share"] for r in rs)
        s["speedup"] = s["sync_step_ms"] / s["async_step_ms"]
        s["ran_ahead_share"] = min(r["ran_ahead"] for r in mine["async"]) / args.steps
        summary.append(s)
    print_table(rows, ["batch", "mode", "steps", "step_ms", "mean_step_ms", "tokens_per_s", "ran_ahead"]
                + (["device_idle_share", "trace_ms"] if trace else []))
    print_table(summary, list(summary[0]))
    print("tokens equal in both modes:", equal)
    metrics = {"rows": rows, "summary": summary, "tokens_equal": equal, "model": label,
               "prompt_len": args.prompt_len, "threads": args.threads}
    write_results("async_scheduling", torch.device(args.device), metrics, args.out)
    return metrics


if __name__ == "__main__":
    main()
