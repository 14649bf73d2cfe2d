"""Offline generation throughput and batch-1 decode latency, against the bandwidth roofline and
transformers `generate` on the same work in the same run.

    python bench/throughput.py                 # GPU: Llama-3.1-8B shape, random bf16 weights
    python bench/throughput.py --model DIR     # a real checkpoint, used as is
    python bench/throughput.py --toy           # any device, a small random model

Workload: 256 requests, input and output lengths uniform in 100-1024, EOS ignored. The roofline
replays the engine's own steps: per step, weight bytes plus the KV bytes its decodes read, over
the measured copy bandwidth, plus its prefill FLOPs over the measured matmul rate.
Writes bench/results/throughput-<device>.json (tokens_per_s, roofline_tokens_per_s,
hf_tokens_per_s, bs1_ms_per_token, bs1_floor_ms).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import copy_bandwidth, matmul_rate, model_dir, sync, write_results  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.profiler import StepProfiler  # noqa: E402


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)
    ]


def run_engine(eng: Engine, work) -> tuple[float, int, StepProfiler]:
    prof = StepProfiler(eng.device)
    eng.profiler = prof  # records each step's token mix (and syncs at phase edges)
    ids = [
        eng.add_request(p, SamplingParams(temperature=1.0, max_tokens=m, ignore_eos=True, seed=i))
        for i, (p, m) in enumerate(work)
    ]
    sync(eng.device)
    start = time.perf_counter()
    outs = eng.run_until_done(ids, use_tqdm=True)
    sync(eng.device)
    eng.profiler = None
    return time.perf_counter() - start, sum(o.stats.generated_tokens for o in outs), prof


def roofline_seconds(eng: Engine, prof: StepProfiler, bandwidth: float, rate: float) -> float:
    """Sum over the engine's steps of the bytes and FLOPs floor."""
    cfg = eng.model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    params = sum(p.numel() for p in eng.model.parameters())
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * eng.runner.kv_cache.element_size()
    total = 0.0
    for s in prof.steps:
        decode_ctx = (
            s.context_tokens if s.prefill_tokens == 0 else s.context_tokens * s.decode_tokens / max(s.seqs, 1)
        )
        total += (weight_bytes + decode_ctx * kv_per_token) / bandwidth
        total += 2 * params * s.prefill_tokens / rate
    return total


def run_hf(path: str, work, device: torch.device, dtype: torch.dtype, dummy: bool, batch: int) -> float:
    """transformers generate (static cache, sdpa) on the same requests, in batches; useful
    tokens per second (each request's own output length)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:
        cfg = AutoConfig.from_pretrained(path)
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    hf.eval()
    useful, start = 0, time.perf_counter()
    for lo in range(0, len(work), batch):
        group = work[lo : lo + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(group):
            ids[i, width - len(p) :] = torch.tensor(p)  # left padding
            mask[i, width - len(p) :] = 1
        new = max(m for _, m in group)
        with torch.no_grad():
            hf.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
            )
        useful += sum(m for _, m in group)
    sync(device)
    return useful / (time.perf_counter() - start)


def bs1_latency(eng: Engine, prompt_len: int, new: int) -> float:
    """Milliseconds per decoded token at batch 1 (the prefill step excluded)."""
    prompt = list(range(5, 5 + prompt_len))
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    rid = eng.add_request(prompt, params)
    eng.step()  # prefill + first token
    sync(eng.device)
    start = time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    sync(eng.device)
    del rid
    return (time.perf_counter() - start) * 1e3 / max(steps, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    toy = args.toy or device.type == "cpu"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    n, lo, hi = (args.requests or 8, 8, 32) if toy else (args.requests or 256, 100, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(model_dir(Path(tmp), toy))
        dummy = args.model is None and not toy
        eng = Engine(
            path,
            device=args.device,
            dtype=dtype,
            load_format="dummy" if dummy else "auto",
            max_batch_tokens=8192 if not toy else 512,
        )
        work = workload(n, lo, hi, eng.model.config.vocab_size)
        bandwidth = copy_bandwidth(device, (8 << 20) if toy else None)
        rate = matmul_rate(device, dtype)
        seconds, tokens, prof = run_engine(eng, work)
        floor = roofline_seconds(eng, prof, bandwidth, rate)
        weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        bs1 = bs1_latency(eng, 128 if not toy else 16, 256 if not toy else 16)
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf_tps = None if args.no_hf else run_hf(path, work, device, dtype, dummy, args.hf_batch)
    metrics = {
        "tokens_per_s": tokens / seconds,
        "roofline_tokens_per_s": tokens / floor,
        "of_roofline": floor / seconds,
        "hf_tokens_per_s": hf_tps,
        "vs_hf": None if hf_tps is None else tokens / seconds / hf_tps,
        "bs1_ms_per_token": bs1,
        "bs1_floor_ms": weight_bytes / bandwidth * 1e3,
        "bs1_of_floor": weight_bytes / bandwidth * 1e3 / bs1,
        "requests": n,
        "output_tokens": tokens,
        "seconds": seconds,
        "steps": prof.summary(),
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "matmul_tflops": rate / 1e12,
    }
    print(
        f"engine {metrics['tokens_per_s']:.0f} tok/s = {metrics['of_roofline']:.0%} of the roofline "
        f"({metrics['roofline_tokens_per_s']:.0f}); transformers "
        f"{'n/a' if hf_tps is None else f'{hf_tps:.0f}'} tok/s; batch-1 {bs1:.2f} ms/token vs floor "
        f"{metrics['bs1_floor_ms']:.2f} ms"
    )
    path = write_results("throughput", device, metrics, args.out, toy=toy, model=args.model or "random")
    print(f"-> {path}")
    return metrics


if __name__ == "__main__":
    main()
