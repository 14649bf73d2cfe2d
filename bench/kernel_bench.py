"""Times every kernel against its torch reference and against its floor (bytes over the measured
copy bandwidth, or FLOPs over the measured matmul rate, whichever is larger; METHOD.md).

    python bench/kernel_bench.py                 # GPU: Llama-3.1-8B shapes, bf16
    python bench/kernel_bench.py --toy           # any device: tiny shapes (CI runs this on the CPU)

Writes bench/results/kernels-<device>.json. Target: paged decode attention at batch 64, context 4k
reaches >= 70% of the copy bandwidth (floor_ms / ms >= 0.7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)  # run as a script: bench/ goes last, after the project's packages
sys.path.append(str(_HERE))
from benchlib import (  # noqa: E402
    copy_bandwidth,
    interpret_triton_without_gpu,
    matmul_rate,
    print_table,
    time_ms,
    write_results,
)

interpret_triton_without_gpu()

import torch  # noqa: E402

from kernels import autotune, cuda_ops  # noqa: E402
from kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from kernels.attention import (  # noqa: E402
    paged_attention_ref,
    paged_decode_attention_triton,
    paged_extend_attention_triton,
)
from kernels.block_copy import copy_blocks_ref  # noqa: E402
from kernels.cascade import cascade_decode_attention, find_shared_prefixes  # noqa: E402
from kernels.kv_store import (  # noqa: E402
    rotary_store_kv_ref,
    rotary_store_kv_triton,
    store_kv_ref,
    store_kv_triton,
)
from kernels.lora import lora_ref, lora_triton  # noqa: E402
from kernels.rmsnorm import rms_norm_ref, rms_norm_triton  # noqa: E402
from kernels.rotary import apply_rotary_ref, apply_rotary_triton, rotary_cache  # noqa: E402
from kernels.sampling import sample_ref, sample_triton  # noqa: E402

FULL = dict(
    tokens=4096,
    hidden=4096,
    inter=14336,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
    batch=64,
    context=4096,
    block_size=16,
    extend=[(8, 512, 4096), (8, 2048, 2048)],  # (sequences, new tokens, context): an extend, a prefill
    cascade=(16, 2048, 64),  # samples, their shared prompt, each one's own tail
    rank=16,
    dtype="bfloat16",
)
TOY = dict(
    tokens=33,
    hidden=64,
    inter=96,
    heads=4,
    kv_heads=2,
    head_dim=64,
    vocab=500,
    batch=3,
    context=70,
    block_size=16,
    extend=[(2, 20, 70), (2, 40, 40)],
    cascade=(4, 48, 5),
    rank=8,
    dtype="float32",
)


def paged_cache(batch, context, kv_heads, head_dim, block_size, dtype, device):
    """Every sequence owns context tokens in shuffled blocks of a cache with no spare blocks."""
    per_seq = -(-context // block_size)
    order = torch.randperm(batch * per_seq, device=device).int()
    tables = order.view(batch, per_seq)
    shape = (batch * per_seq * block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    ctx = torch.full((batch,), context, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, ctx


def cases(s: dict, device: torch.device):
    """(op, shape, bytes moved, flops, {impl: callable}) for each kernel."""
    dt = getattr(torch, s["dtype"])
    el = torch.empty((), dtype=dt).element_size()
    T, H, I = s["tokens"], s["hidden"], s["inter"]  # noqa: E741
    nh, nkv, d = s["heads"], s["kv_heads"], s["head_dim"]
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dt)  # noqa: E731

    x, res, w = rnd(T, H), rnd(T, H), rnd(H)
    yield (
        "rms_norm+residual",
        f"{T}x{H}",
        4 * T * H * el + H * el,
        0,
        {"torch": lambda: rms_norm_ref(x, w, 1e-5, res), "triton": lambda: rms_norm_triton(x, w, 1e-5, res)},
    )

    gu = rnd(T, 2 * I)
    yield (
        "silu_and_mul",
        f"{T}x{I}",
        3 * T * I * el,
        0,
        {"torch": lambda: silu_and_mul_ref(gu), "triton": lambda: silu_and_mul_triton(gu)},
    )

    qkv = rnd(T, (nh + 2 * nkv) * d)
    q = qkv[:, : nh * d].view(T, nh, d)
    k = qkv[:, nh * d : (nh + nkv) * d].view(T, nkv, d)
    v = qkv[:, (nh + nkv) * d :].view(T, nkv, d)
    pos = torch.randint(0, 8192, (T,), device=device)
    cs = rotary_cache(1.0 / (500000 ** (torch.arange(0, d, 2).float() / d)), 8192).to(device)
    yield (
        "rotary",
        f"{T}x({nh}+{nkv})x{d}",
        2 * T * (nh + nkv) * d * el + T * d * 4,
        0,
        {
            "torch": lambda: apply_rotary_ref(q, k, pos, cs),
            "triton": lambda: apply_rotary_triton(q, k, pos, cs),
        },
    )

    kc, vc = (
        torch.empty(4 * T, nkv, d, device=device, dtype=dt),
        torch.empty(4 * T, nkv, d, device=device, dtype=dt),
    )
    slots = torch.randperm(4 * T, device=device)[:T]
    impls = {
        "torch": lambda: store_kv_ref(k, v, kc, vc, slots),
        "triton": lambda: store_kv_triton(k, v, kc, vc, slots),
    }
    if cuda_ops.available(k):
        impls["cuda"] = lambda: cuda_ops.store_kv_cuda(k, v, kc, vc, slots)
    yield ("store_kv", f"{T}x{nkv}x{d}", 4 * T * nkv * d * el, 0, impls)

    # What the model runs: rotary on q and k, then k and v into the cache. Fused, the rotated keys
    # go straight to their slots (reads q, k, v once; writes q and the two cache rows).
    def separate():
        q_rot, k_rot = apply_rotary_triton(q, k, pos, cs)
        store_kv_triton(k_rot, v, kc, vc, slots)
        return q_rot

    yield (
        "rotary+store_kv",
        f"{T}x({nh}+{nkv}+{nkv})x{d}",
        2 * T * (nh + 2 * nkv) * d * el + T * d * 4,
        0,
        {
            "torch": lambda: rotary_store_kv_ref(q, k, v, kc, vc, slots, pos, cs),
            "triton": separate,
            "fused": lambda: rotary_store_kv_triton(q, k, v, kc, vc, slots, pos, cs),
        },
    )

    B, C, bs = s["batch"], s["context"], s["block_size"]
    kc2, vc2, tables, ctx = paged_cache(B, C, nkv, d, bs, dt, device)
    qd = rnd(B, nh, d)
    qsl = torch.arange(B + 1, dtype=torch.int32, device=device)
    scale = d**-0.5
    impls = {
        "torch": lambda: paged_attention_ref(qd, kc2, vc2, tables, ctx, qsl, bs, scale),
        "triton": lambda: paged_decode_attention_triton(qd, kc2, vc2, tables, ctx, bs, scale, C),
    }
    yield (
        "decode_attention",
        f"b{B} ctx{C} {nh}/{nkv}x{d}",
        2 * B * C * nkv * d * el + 2 * B * nh * d * el,
        4 * B * C * nh * d,
        impls,
    )

    # Samples of one prompt decoding together: plain paged decode reads the shared prompt once per
    # sample, cascade once per step; one sequence at the same context is the yardstick.
    n, P, tail = s["cascade"]
    shared_blocks, own_blocks = P // bs, -(-tail // bs)
    kc4 = torch.randn((shared_blocks + n * own_blocks) * bs, nkv, d, device=device, dtype=dt)
    vc4 = torch.randn_like(kc4)
    tables4 = torch.cat([torch.arange(shared_blocks).expand(n, -1),
                         shared_blocks + torch.arange(n * own_blocks).view(n, own_blocks)], 1).int()
    ctx4 = torch.full((n,), P + tail, dtype=torch.int32)
    shared = find_shared_prefixes(tables4.numpy(), ctx4.numpy(), bs, min_prefix=0).to(device)
    tables4, ctx4, q4 = tables4.to(device), ctx4.to(device), rnd(n, nh, d)
    a = (kc4, vc4, tables4, ctx4, bs, scale)
    one = 2 * (P + tail) * nkv * d * el
    first = (q4[:1], kc4, vc4, tables4[:1], ctx4[:1], bs, scale, P + tail)
    yield ("decode_attention 1 seq", f"ctx{P + tail} {nh}/{nkv}x{d}", one, 4 * (P + tail) * nh * d,
           {"triton": lambda: paged_decode_attention_triton(*first)})
    yield (
        "decode_attention shared prefix",
        f"{n} samples, {P} shared + {tail} own, {nh}/{nkv}x{d}",
        2 * (P + n * tail) * nkv * d * el,
        4 * n * (P + tail) * nh * d,
        {
            "triton": lambda: paged_decode_attention_triton(q4, *a[:4], bs, scale, P + tail),
            "cascade": lambda: cascade_decode_attention(q4, *a, shared),
        },
    )
    for S, Q, C in s["extend"]:
        kc3, vc3, tables3, ctx3 = paged_cache(S, C, nkv, d, bs, dt, device)
        qe = rnd(S * Q, nh, d)
        qsl3 = (torch.arange(S + 1, device=device) * Q).int()
        # Each query sees the prefix (C - Q) plus its causal part of the chunk.
        flops = 4 * S * nh * d * (Q * (C - Q) + Q * (Q + 1) // 2)
        a = (qe, kc3, vc3, tables3, ctx3, qsl3, bs, scale)
        yield (
            "extend_attention",
            f"{S}x{Q} new, ctx{C}",
            2 * S * C * nkv * d * el + 2 * S * Q * nh * d * el,
            flops,
            {
                "torch": lambda a=a: paged_attention_ref(*a),
                "triton": lambda a=a, Q=Q: paged_extend_attention_triton(*a, Q),
            },
        )

    V = s["vocab"]
    logits = 4 * torch.randn(B, V, device=device)
    temp = torch.full((B,), 0.8, device=device)
    topk = torch.zeros(B, dtype=torch.int64, device=device)
    topp = torch.ones(B, device=device)
    seeds = torch.arange(B, device=device)
    steps = torch.full((B,), 7, device=device)
    yield (
        "sample",
        f"{B}x{V}",
        B * V * 4,
        0,
        {
            "torch": lambda: sample_ref(logits, temp, topk, topp, seeds, steps),
            "triton": lambda: sample_triton(logits, temp, topk, topp, seeds, steps),
        },
    )
    # Serving's usual filters: each row's candidate is checked against top-k and top-p (no sort).
    topk50, topp9 = torch.full_like(topk, 50), torch.full_like(topp, 0.9)
    yield (
        "sample top-k 50, top-p 0.9",
        f"{B}x{V}",
        B * V * 4,
        0,
        {
            "torch": lambda: sample_ref(logits, temp, topk50, topp9, seeds, steps),
            "triton": lambda: sample_triton(logits, temp, topk50, topp9, seeds, steps),
        },
    )

    r = s["rank"]
    xl, yl = rnd(T, H), rnd(T, (nh + 2 * nkv) * d)
    la, lb = 0.01 * rnd(r, H), 0.01 * rnd((nh + 2 * nkv) * d, r)
    mask = torch.arange(T, device=device) >= T - max(1, T // 8)  # the last eighth is suffix
    m = int(mask.sum())
    yield (
        "lora_masked (1/8 rows)",
        f"{T}x{H}->{yl.shape[1]} r{r}",
        m * (H + 2 * yl.shape[1]) * el + r * (H + yl.shape[1]) * el,
        2 * m * r * (H + yl.shape[1]),
        {
            "torch": lambda: lora_ref(xl, yl, la, lb, 0.5, mask),
            "triton": lambda: lora_triton(xl, yl, la, lb, 0.5, mask),
        },
    )

    blocks, numel = 64, bs * nkv * d
    kv = rnd(2 * 32, 4 * blocks, numel)  # 32 layers x (K, V)
    pairs = torch.stack([torch.arange(blocks), torch.arange(blocks) + blocks], 1).to(device, torch.int32)
    impls = {"torch": lambda: copy_blocks_ref(kv, pairs)}
    if cuda_ops.available(kv):
        impls["cuda"] = lambda: cuda_ops.copy_blocks_cuda(kv, pairs)
    yield ("copy_blocks", f"{blocks} pairs x64 caches", 2 * 64 * blocks * numel * el, 0, impls)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny shapes (CPU / CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    toy = args.toy or device.type != "cuda"
    shapes = TOY if toy else FULL
    reps = args.reps or (2 if toy else 50)
    bandwidth = copy_bandwidth(device, (8 << 20) if toy else None)
    rate = matmul_rate(device, getattr(torch, shapes["dtype"]))
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {rate / 1e12:.2f} TFLOP/s ({shapes['dtype']})")
    rows = []
    for op, shape, nbytes, flops, impls in cases(shapes, device):
        floor_ms = max(nbytes / bandwidth, flops / rate) * 1e3
        for impl, fn in impls.items():
            ms = time_ms(fn, device, reps=reps, warmup=1 if toy else 5)
            rows.append(
                {
                    "op": op,
                    "shape": shape,
                    "impl": impl,
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "of_floor": floor_ms / ms,
                    "GB/s": nbytes / ms / 1e6,
                }
            )
    print_table(rows, ["op", "shape", "impl", "ms", "floor_ms", "of_floor", "GB/s"])
    one = next(r["ms"] for r in rows if r["op"] == "decode_attention 1 seq")
    shared_n = shapes["cascade"][0]
    cascade = next(r["ms"] for r in rows
                   if r["op"] == "decode_attention shared prefix" and r["impl"] == "cascade")
    decode = [r for r in rows if r["op"] == "decode_attention" and r["impl"] != "torch"]
    best = max(decode, key=lambda r: r["of_floor"])
    metrics = {
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "matmul_tflops": rate / 1e12,
        "kernels": rows,
        "decode_attention_best": {"impl": best["impl"], "of_copy_bandwidth": best["of_floor"]},
        # target <= 1.5 (issue 18): the samples of a request decode at nearly one sequence's cost
        "shared_prefix_cascade_over_one_seq": cascade / one,
        "dispatch_winners": {str(k): v for k, v in autotune.winners().items()},
    }
    path = write_results("kernels", device, metrics, args.out, shapes=shapes, toy=toy)
    print(f"decode attention: {best['impl']} at {best['of_floor']:.0%} of copy bandwidth; "
          f"{shared_n} samples over a shared prompt (cascade): {cascade / one:.2f}x one sequence -> {path}")
    return metrics


if __name__ == "__main__":
    main()
