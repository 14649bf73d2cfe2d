"""CPU attention on the steps a server runs: decodes beside prompt chunks. engine._cpu's attention
(kernels.cpu_ops.paged_attention: every query row in one call) against the torch path
(kernels.attention.paged_attention_cpu: rows grouped by query length, blocks gathered, matmuls
under a causal mask), with and without its per-step plan made beforehand, outputs checked against
the reference (paged_attention_ref). kernels.attention.CPU_ROWS_MAX_PREFIX_KEYS was set by hand
from these rows: past it, chunks follow long cached prefixes, which the torch path's matmuls read
at a better rate.
The torch path's plan is made once a step for every layer: per layer, compare with torch_planned_ms.

    python bench/cpu_attention.py [--threads 2] [--reps 20]

Writes bench/results/cpu_attention-cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import print_table, time_ms, write_results  # noqa: E402

from kernels import cpu_ops  # noqa: E402
from kernels.attention import (  # noqa: E402
    CPU_ROWS_MAX_PREFIX_KEYS,
    count_prefix_keys,
    cpu_rows_attention,
    paged_attention_cpu,
    paged_attention_ref,
    plan_cpu_attention,
)

# (decodes, chunks, chunk length, tokens cached before each chunk); decodes see 160 keys
CASES = [(64, 0, 1, 0), (60, 4, 8, 0), (60, 4, 32, 0), (60, 4, 64, 0), (60, 4, 128, 0), (0, 1, 128, 0),
         (0, 1, 256, 0), (0, 1, 512, 0), (0, 16, 128, 0), (0, 1, 1024, 0), (60, 1, 64, 1000),
         (60, 1, 64, 4000), (0, 1, 512, 2048)]
BLOCK = 16


def step(decodes: int, chunks: int, chunk: int, prior: int, heads: int, kv_heads: int, dim: int,
         decode_context: int = 160):
    g = torch.Generator().manual_seed(0)
    q_lens = [1] * decodes + [chunk] * chunks
    ctx = [decode_context] * decodes + [prior + chunk] * chunks
    width = max(-(-c // BLOCK) for c in ctx)
    blocks = len(ctx) * width + 4
    k_cache = torch.randn(blocks * BLOCK, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks * BLOCK, kv_heads, dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[: len(ctx) * width].view(len(ctx), width).int()
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    return q, k_cache, v_cache, tables, torch.tensor(ctx, dtype=torch.int32), qsl


def case(decodes: int, chunks: int, chunk: int, prior: int, reps: int, shape: tuple[int, int, int]) -> dict:
    cpu, scale = torch.device("cpu"), shape[2] ** -0.5
    q, kc, vc, tables, ctx, qsl = step(decodes, chunks, chunk, prior, *shape)
    offsets = None if chunks == 0 else qsl
    ref = paged_attention_ref(q, kc, vc, tables, ctx, qsl, BLOCK, scale)
    out = cpu_ops.paged_attention(q, kc, vc, tables, ctx, offsets, BLOCK, scale)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    plan = plan_cpu_attention(tables, ctx, qsl, BLOCK)
    keys = count_prefix_keys(qsl[1:] - qsl[:-1], ctx)
    row = {"decodes": decodes, "chunks": f"{chunks} x {chunk}", "cached_before_chunk": prior,
           "prefix_keys": keys, "max_error": (out - ref).abs().max().item()}
    row["cpp_ms"] = time_ms(lambda: cpu_ops.paged_attention(q, kc, vc, tables, ctx, offsets, BLOCK, scale),
                            cpu, reps=reps)
    row["torch_planned_ms"] = time_ms(
        lambda: paged_attention_cpu(q, kc, vc, tables, ctx, qsl, BLOCK, scale, plan=plan), cpu, reps=reps)
    row["torch_with_plan_ms"] = time_ms(
        lambda: paged_attention_cpu(q, kc, vc, tables, ctx, qsl, BLOCK, scale), cpu, reps=reps)
    row["torch_with_plan_over_cpp"] = row["torch_with_plan_ms"] / row["cpp_ms"]
    row["torch_planned_over_cpp"] = row["torch_planned_ms"] / row["cpp_ms"]
    row["dispatch"] = "cpp" if cpu_rows_attention(chunk, keys) else "torch"
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases")
    # default: the CPU throughput model's attention (bench/throughput.py); 4 / 2 / 16: the toy model's
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if cpu_ops.extension() is None:
        raise SystemExit("engine._cpu is not built")
    torch.set_num_threads(args.threads)
    shape = (args.heads, args.kv_heads, args.head_dim)
    rows = [case(*c, reps=args.reps, shape=shape) for c in CASES[: args.cases]]
    print_table(rows, ["decodes", "chunks", "cached_before_chunk", "prefix_keys", "cpp_ms",
                       "torch_planned_ms", "torch_with_plan_ms", "torch_planned_over_cpp", "dispatch"])
    metrics = {"rows": rows, "threads": args.threads, "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "block_size": BLOCK, "decode_context": 160,
               "cpu_rows_max_prefix_keys": CPU_ROWS_MAX_PREFIX_KEYS}
    write_results("cpu_attention", torch.device("cpu"), metrics, args.out)
    return metrics


if __name__ == "__main__":
    main()
