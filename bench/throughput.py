"""Offline generation throughput and batch-1 decode latency, against the bandwidth roofline and
transformers `generate` on the same work in the same run.

    python bench/throughput.py                 # GPU: Llama-3.1-8B shape, random bf16 weights
    python bench/throughput.py --model DIR     # a real checkpoint, used as is
    python bench/throughput.py --toy           # any device, a small random model
    python bench/throughput.py --device cpu    # CPU: engine vs transformers, batch 1 and 16

Workload: 256 requests, input and output lengths uniform in 100-1024, EOS ignored. The roofline
replays the engine's own steps: per step, weight bytes plus the KV bytes its decodes read, over
the measured copy bandwidth, plus its prefill FLOPs over the measured matmul rate.
Writes bench/results/throughput-<device>.json (tokens_per_s, roofline_tokens_per_s,
hf_tokens_per_s, bs1_ms_per_token, bs1_floor_ms).

On a CPU without --toy: the engine against transformers `generate` (sdpa, eval, inference mode,
the faster cache there) on one random Llama (8 layers, hidden 512, 8 heads over 2 KV heads), or
--model, at each --batch-sizes: greedy, equal prompts of --prompt-len random tokens, --new-tokens
each, EOS ignored, every thread of the machine on both sides. A warm-up on other prompts is not
timed; the timed runs alternate between the two, and each side keeps its best of --reps. The
engine runs without prefix caching, since the reps repeat the prompts. Reports tokens/s of both,
their ratio and how many requests got the same tokens (a late flip of a near tie is possible, so
it is counted, not asserted). Each side's run is also split into the prompt (prefill and the
first token, timed alone) and each further decode step, and set against the matmul floor: the
model's weight GEMMs alone as torch matmuls on this machine. hf time over the run's floor
is the most any engine could gain on transformers here. Writes bench/results/throughput-cpu.json.
"""

from __future__ import annotations

import argparse
import os
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
from benchlib import (  # noqa: E402
    copy_bandwidth,
    matmul_rate,
    model_dir,
    print_table,
    sync,
    time_ms,
    write_results,
)

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


def load_hf(path: str, device: torch.device, dtype: torch.dtype, dummy: bool):
    """The transformers model in its fastest plain setup: sdpa attention, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:
        cfg = AutoConfig.from_pretrained(path)
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    return hf.eval()


def run_hf(path: str, work, device: torch.device, dtype: torch.dtype, dummy: bool, batch: int) -> float:
    """transformers generate (static cache, sdpa) on the same requests, in batches; useful
    tokens per second (each request's own output length)."""
    hf = load_hf(path, device, dtype, dummy)
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


CPU_SHAPE = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2
)


def engine_greedy(eng: Engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """Seconds to generate `new` greedy tokens for every prompt in one continuous batch, and them."""
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    outs = eng.run_until_done([eng.add_request(p, params) for p in prompts])
    return time.perf_counter() - start, [o.samples[0].token_ids for o in outs]


def hf_greedy(hf, prompts: list[list[int]], new: int, cache: str) -> tuple[float, list[list[int]]]:
    """The same with transformers generate: one batch, no padding (the prompts are equally long)."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          do_sample=False, cache_implementation=cache, pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def matmul_floor_s(cfg, rows: int, head_rows: int) -> float:
    """Seconds of the weight matmuls alone of one forward: every layer's projections on `rows`
    tokens and the LM head on `head_rows`, as torch GEMMs on weights of the model's shapes, one
    set per layer (so a small batch streams them from memory as a real forward does), fp32, this
    process's threads; the faster of plain [out, in] weights (F.linear) and the engine's packed
    layout (kernels/linear.py). Attention, norms and everything else count 0, so this is a floor no
    implementation on this machine goes under."""
    from kernels.linear import pack_weight, packed_linear

    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    shapes = [(q + 2 * cfg.num_kv_heads * cfg.head_dim, h), (h, q), (2 * cfg.intermediate_size, h),
              (h, cfg.intermediate_size)]
    layers = [[torch.randn(o, i) for o, i in shapes] for _ in range(cfg.num_layers)]
    xs = [torch.randn(rows, i) for _, i in shapes]
    head, x_head = torch.randn(cfg.vocab_size, h), torch.randn(head_rows, h)
    parts = torch.get_num_threads()
    packed = [[pack_weight(w, parts) if w.shape[0] % parts == 0 else w for w in ws] for ws in layers]
    lin = torch.nn.functional.linear

    def plain():
        for ws in layers:
            for x, w in zip(xs, ws):
                lin(x, w)
        lin(x_head, head)

    def blocked():
        for ws in packed:
            for x, w in zip(xs, ws):
                packed_linear(x, w) if w.dim() == 3 else lin(x, w)
        lin(x_head, head)

    with torch.inference_mode():
        return min(time_ms(f, torch.device("cpu"), reps=7) for f in (plain, blocked)) / 1e3


def cpu_vs_hf(path: str, args) -> dict:
    """Engine and transformers on the same greedy batches, timed alternately; best of args.reps."""
    torch.set_num_threads(args.threads)
    # No prefix caching: the timed runs repeat the same prompts, and transformers keeps nothing
    # between calls (with it, the engine's 2nd and 3rd runs skipped the prefill: 2026-11-25's
    # 1.72x at batch 16 was 1.1x cold).
    eng = Engine(path, device="cpu", dtype=torch.float32, enable_prefix_caching=False)
    hf = None if args.no_hf else load_hf(path, torch.device("cpu"), torch.float32, dummy=False)
    if hf is not None:
        hf.generation_config.eos_token_id = None  # EOS ignored, as in the engine's requests
    vocab = eng.model.config.vocab_size
    rows = []
    for batch in args.batch_sizes:
        rng = random.Random(batch)
        warm, prompts = ([[rng.randrange(5, vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
                         for _ in range(2))
        engine_greedy(eng, warm, min(args.new_tokens, 8))
        if hf is not None:
            hf_greedy(hf, warm, min(args.new_tokens, 8), args.hf_cache)
        eng_s, hf_s, same, first = [], [], None, None
        eng_p, hf_p = [], []  # the prompt alone: prefill and one token
        for _ in range(args.reps):
            eng_p.append(engine_greedy(eng, prompts, 1)[0])
            seconds, eng_tokens = engine_greedy(eng, prompts, args.new_tokens)
            eng_s.append(seconds)
            if hf is None:
                continue
            hf_p.append(hf_greedy(hf, prompts, 1, args.hf_cache)[0])
            seconds, hf_tokens = hf_greedy(hf, prompts, args.new_tokens, args.hf_cache)
            hf_s.append(seconds)
            same = sum(a == b for a, b in zip(eng_tokens, hf_tokens))
            flips = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                     for a, b in zip(eng_tokens, hf_tokens) if a != b]
            first = min(flips, default=None)
        tokens = batch * args.new_tokens
        eng_tps = tokens / min(eng_s)
        hf_tps = tokens / min(hf_s) if hf_s else None
        # Where the time goes: the prompt (prefill + first token) and each further decode step,
        # each against its matmul floor. The run's floor bounds how far ahead of transformers
        # any engine can get here: hf time / floor time.
        cfg = eng.model.config
        prefill_floor = matmul_floor_s(cfg, batch * args.prompt_len, batch)
        step_floor = matmul_floor_s(cfg, batch, batch)
        run_floor = prefill_floor + (args.new_tokens - 1) * step_floor
        steps = max(args.new_tokens - 1, 1)
        split = {
            "engine_prefill_s": min(eng_p),
            "engine_decode_step_ms": (min(eng_s) - min(eng_p)) / steps * 1e3,
            "hf_prefill_s": min(hf_p) if hf_p else None,
            "hf_decode_step_ms": (min(hf_s) - min(hf_p)) / steps * 1e3 if hf_s else None,
            "prefill_matmul_floor_s": prefill_floor,
            "decode_step_matmul_floor_ms": step_floor * 1e3,
            "engine_decode_step_over_floor": (min(eng_s) - min(eng_p)) / steps / step_floor,
            "engine_prefill_over_floor": min(eng_p) / prefill_floor,
            "run_matmul_floor_s": run_floor,
            "max_vs_hf_at_floor": min(hf_s) / run_floor if hf_s else None,
        }
        rows.append({
            "batch": batch,
            "engine_tokens_per_s": eng_tps,
            "hf_tokens_per_s": hf_tps,
            "vs_hf": None if hf_tps is None else eng_tps / hf_tps,
            "same_requests": same,
            "requests": batch,
            "first_mismatch": first,  # the earliest generated position where a request differs
            "engine_seconds": eng_s,
            "hf_seconds": hf_s,
            **split,
        })
    print_table(rows, ["batch", "engine_tokens_per_s", "hf_tokens_per_s", "vs_hf", "same_requests",
                       "requests", "first_mismatch"])
    print_table(rows, ["batch", "engine_prefill_s", "hf_prefill_s", "prefill_matmul_floor_s",
                       "engine_decode_step_ms", "hf_decode_step_ms", "decode_step_matmul_floor_ms",
                       "engine_decode_step_over_floor", "max_vs_hf_at_floor"])
    return {
        "by_batch": rows,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "threads": args.threads,
        "hf_cache": args.hf_cache,
        "engine_prefix_caching": eng.config.enable_prefix_caching,
        "model_shape": None if args.model else CPU_SHAPE,
        "vocab_size": vocab,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="the engine over N ranks (the roofline is then one rank's: its weight shard)")
    ap.add_argument("--out", default=None)
    cpu = ap.add_argument_group("CPU against transformers (--device cpu without --toy)")
    cpu.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    cpu.add_argument("--prompt-len", type=int, default=128)
    cpu.add_argument("--new-tokens", type=int, default=64)
    cpu.add_argument("--reps", type=int, default=3)
    cpu.add_argument("--threads", type=int, default=os.cpu_count())
    cpu.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.toy:
        from engine.testing.make_model import make_model

        with tempfile.TemporaryDirectory() as tmp:
            path = args.model or str(make_model(Path(tmp) / "llama-8x512", "llama", seed=0, **CPU_SHAPE))
            metrics = cpu_vs_hf(path, args)
        out = write_results("throughput", device, metrics, args.out, workload="cpu_vs_hf",
                            model=args.model or "random")
        print(f"-> {out}")
        return metrics
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
            tensor_parallel_size=args.tensor_parallel_size,
        )
        work = workload(n, lo, hi, eng.model.config.vocab_size)
        bandwidth = copy_bandwidth(device, (8 << 20) if toy else None)
        rate = matmul_rate(device, dtype)
        seconds, tokens, prof = run_engine(eng, work)
        floor = roofline_seconds(eng, prof, bandwidth, rate)
        weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        bs1 = bs1_latency(eng, 128 if not toy else 16, 256 if not toy else 16)
        eng.shutdown()
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
        "tensor_parallel_size": args.tensor_parallel_size,
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
