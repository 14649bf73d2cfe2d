"""The HTTP server under load: requests from an async client on loopback, a fixed number in flight,
mixed plain sampling, best-of-4 and prune policies; a bounded run that ends by itself. Reports
errors (0 required), p50/p99 time to first token and latency, output tokens/s, that KV blocks
return to their baseline, and the engine's offline throughput on the same work in the same run
(target: server >= 90% of offline). Offline runs every request at once on a fresh engine after
the same warm-up; the server sees at most `--concurrency` at a time, so batch sizes differ.

    python bench/serve_load.py [--requests 1000] [--concurrency 64] [--max-tokens 32] [--model DIR]
    python bench/serve_load.py --pin     # CPU: the engine gets core 0 alone, server and offline alike

On a small CPU the client, the HTTP server and the engine share the cores, so the server's
throughput there measures CPU sharing as much as serving; --pin gives the engine the same one core
in both runs (HTTP and client on the rest), which isolates what serving costs the engine.

Writes bench/results/serve_load-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import httpx  # noqa: E402
import torch  # noqa: E402
from benchlib import model_dir, print_table, write_results  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.policies import BestOfN, Prune  # noqa: E402

KINDS = ("plain", "best_of_4", "prune")


def warmup(work: list[dict]) -> list[dict]:
    """The first 8 requests under other seeds: a warm-up whose samples (and self-evaluation scores,
    which the engine's score cache keeps) the timed run does not repeat."""
    return [{**it, "seed": it["seed"] + 1_000_000} for it in work[:8]]


def workload(n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(4, 40)))
        out.append({"kind": KINDS[i % 3], "prompt": prompt, "seed": i, "max_tokens": max_tokens})
    return out


def body(item: dict, stream: bool = True) -> dict:
    b = {"model": "m", "prompt": item["prompt"], "max_tokens": item["max_tokens"], "seed": item["seed"],
         "temperature": 1.0, "ignore_eos": True, "stream": stream}
    if item["kind"] == "best_of_4":
        b["policy"] = {"type": "best_of_n", "n": 4}
    elif item["kind"] == "prune":
        b["policy"] = {"type": "prune", "n": 4, "checkpoints": [8], "keep": 0.5}
    return b


async def drive(url: str, work: list[dict], concurrency: int) -> list[dict]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(item):
            async with gate:
                start, first, ok = time.perf_counter(), None, False
                try:
                    async with client.stream("POST", "/v1/completions", json=body(item)) as r:
                        tail = b""  # raw chunks, not lines: the client's CPU is the server's too here
                        async for chunk in r.aiter_raw():
                            if first is None and b"data: {" in chunk:
                                first = time.perf_counter()
                            tail = (tail + chunk)[-32:]
                        ok = r.status_code == 200 and tail.endswith(b"data: [DONE]\n\n")
                except httpx.HTTPError:
                    ok = False
                end = time.perf_counter()
                return {"ok": ok, "ttft": (first or end) - start, "latency": end - start,
                        "kind": item["kind"]}

        return await asyncio.gather(*(one(item) for item in work))


def offline_seconds(path: str, work: list[dict], device: str, concurrency: int | None,
                    load_format: str = "auto") -> tuple[float, int, float]:
    """Engine.add_request/step on the same work, in this process (no HTTP): every request at
    once (concurrency None), or at most `concurrency` in flight as the server sees them. Returns
    (seconds, tokens, CPU seconds of this process's threads over the run)."""
    eng = Engine(path, device=device, load_format=load_format)

    def add(it):
        params = SamplingParams(temperature=1.0, max_tokens=it["max_tokens"], ignore_eos=True,
                                seed=it["seed"])
        policy = (None if it["kind"] == "plain" else BestOfN(4) if it["kind"] == "best_of_4"
                  else Prune(4, checkpoints=(8,), keep=0.5))
        return eng.add_request(it["prompt"], params, policy)

    eng.run_until_done([add(it) for it in warmup(work)])
    pending, live, tokens = list(reversed(work)), set(), 0
    limit = concurrency or len(work)
    start, cpu = time.perf_counter(), time.process_time()
    while pending or live:
        while pending and len(live) < limit:
            live.add(add(pending.pop()))
        for out in eng.step():
            live.discard(out.request_id)
            tokens += out.stats.generated_tokens
    return time.perf_counter() - start, tokens, time.process_time() - cpu


def cpu_seconds(pid: int | None = None) -> dict[str, float]:
    """User + system CPU seconds of a process (this one if None) and of each of its children
    (the server's engine process), by name, from /proc (Linux)."""
    if pid is None:
        return {"client": time.process_time()}
    out = {}
    for p in [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        stat = Path(f"/proc/{p}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out["server" if p == pid else "engine_process"] = seconds
    return out


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of a process onto `cores` (sched_setaffinity of a pid moves one thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cores)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None)
    ap.add_argument("--toy", action="store_true", help="a small random model (the default on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="torch threads of the engine, in the server and offline alike (default: torch's)")
    ap.add_argument("--engine-thread", action="store_true",
                    help="run the engine loop in a thread of the HTTP process (default: its own process)")
    ap.add_argument("--pin", action="store_true",
                    help="CPU: the engine (server's engine process, and offline) on core 0 with one torch "
                         "thread; the HTTP server and the client on the other cores")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    all_cores = os.sched_getaffinity(0)
    if args.pin:
        if args.engine_thread or len(all_cores) < 2:
            ap.error("--pin needs the engine process (not --engine-thread) and two cores or more")
        args.engine_threads = 1
    engine_core, other_cores = {min(all_cores)}, all_cores - {min(all_cores)}
    if args.engine_threads:
        torch.set_num_threads(args.engine_threads)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.engine_threads)} if args.engine_threads else {}))
    work = workload(args.requests, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        toy = args.toy or args.device == "cpu"
        path = args.model or str(model_dir(Path(tmp), toy=toy))
        load_format = "dummy" if args.model is None and not toy else "auto"  # the 8B shape, random weights
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", path, "--port", str(port),
               "--served-model-name", "m", "--device", args.device, "--load-format", load_format]
        proc = subprocess.Popen(cmd + (["--no-engine-process"] if args.engine_thread else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            if args.pin:
                pin(proc.pid, other_cores)
                for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                    pin(int(child), engine_core)
                pin(os.getpid(), other_cores)
            asyncio.run(drive(url, warmup(work), 8))
            before = httpx.get(f"{url}/metrics").text
            cpu_server, cpu_client = cpu_seconds(proc.pid), cpu_seconds()
            start = time.perf_counter()
            results = asyncio.run(drive(url, work, args.concurrency))
            seconds = time.perf_counter() - start
            cpu_server = {k: v - cpu_server.get(k, 0.0) for k, v in cpu_seconds(proc.pid).items()}
            cpu_client = cpu_seconds()["client"] - cpu_client["client"]
            after = httpx.get(f"{url}/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if args.pin:
            pin(os.getpid(), engine_core)
        offline_s, offline_tokens, _ = offline_seconds(path, work, args.device, None, load_format)
        same_s, same_tokens, same_cpu = offline_seconds(path, work, args.device, args.concurrency,
                                                        load_format)

    def metric(text, name):
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    name = "selfeval_tokens_generated_total"
    tokens = metric(after, name) - metric(before, name)
    ttft = sorted(r["ttft"] for r in results)
    lat = sorted(r["latency"] for r in results)
    pct = lambda xs, q: xs[min(int(q * len(xs)), len(xs) - 1)]  # noqa: E731
    engine_cpu = cpu_server.get("engine_process")
    metrics = {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "errors": sum(not r["ok"] for r in results), "seconds": seconds,
        "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
        "latency_p50_s": statistics.median(lat), "latency_p99_s": pct(lat, 0.99),
        "tokens_per_s": tokens / seconds, "offline_tokens_per_s": offline_tokens / offline_s,
        "server_over_offline": (tokens / seconds) / (offline_tokens / offline_s),
        "offline_same_concurrency_tokens_per_s": same_tokens / same_s,
        "server_over_offline_same_concurrency": (tokens / seconds) / (same_tokens / same_s),
        "engine_steps": metric(after, "selfeval_steps_total") - metric(before, "selfeval_steps_total"),
        "engine_step_seconds": (metric(after, "selfeval_step_seconds_total")
                                - metric(before, "selfeval_step_seconds_total")),
        "cpu_seconds_http_server": cpu_server["server"],
        "cpu_seconds_engine_process": cpu_server.get("engine_process"), "cpu_seconds_client": cpu_client,
        # What serving costs the engine itself, apart from sharing the cores: its process's CPU time
        # per token against the offline run's at the same concurrency (None: the loop in a thread).
        "offline_same_concurrency_cpu_seconds": same_cpu,
        "engine_cpu_over_offline_per_token": (None if engine_cpu is None else
                                              (engine_cpu / tokens) / (same_cpu / same_tokens)),
        "cpu_cores": os.cpu_count(), "engine_threads": torch.get_num_threads(),
        "engine_loop": "thread" if args.engine_thread else "process", "pinned": args.pin,
        "kv_blocks_used_after": metric(after, "selfeval_kv_blocks_used"),
        # A policy's pick streams once it is known: its first token comes at its end.
        "ttft_p50_s_by_kind": {k: statistics.median(r["ttft"] for r in results if r["kind"] == k)
                               for k in KINDS if any(r["kind"] == k for r in results)},
    }
    print_table([metrics], ["requests", "errors", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                            "latency_p99_s", "tokens_per_s", "offline_tokens_per_s", "server_over_offline",
                            "server_over_offline_same_concurrency"])
    print(json.dumps({k: metrics[k] for k in ("errors", "kv_blocks_used_after", "server_over_offline",
                                              "server_over_offline_same_concurrency", "engine_step_seconds",
                                              "cpu_seconds_http_server", "cpu_seconds_engine_process",
                                              "cpu_seconds_client", "engine_cpu_over_offline_per_token",
                                              "ttft_p50_s_by_kind")}))
    out = write_results("serve_load", torch.device(args.device), metrics, args.out,
                        model=args.model or ("random toy" if toy else "llama-3.1-8b shape, random weights"))
    print(f"-> {out}")
    return metrics


if __name__ == "__main__":
    main()
