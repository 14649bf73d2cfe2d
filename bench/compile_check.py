"""Compiles every Triton kernel for a GPU that is not here, at the Llama-3.1-8B shapes of the
kernel bench, and reports what the compiler made of it: registers per thread, stack and local
memory (spills), dynamic shared memory. Nothing runs.

    python bench/compile_check.py              # sm_90 (H100), bf16, kernel_bench's FULL shapes
    python bench/compile_check.py --arch 80
    python bench/compile_check.py --toy        # tiny float32 shapes: what the GPU tests compile

The Triton interpreter (how the tests run the kernels on a CPU) accepts code that the real
compiler rejects (an `if` whose branches give one name two types, a dot below 16 rows, ...);
GPU time is rare, so this finds those failures, and register spills, before a GPU run does.
Every wrapper is called as the kernel bench calls it, with CPU tensors of the real shapes
(zero-filled: values do not matter); then the model itself runs one decoder layer of the 8B
shape with a LoRA adapter through two steps (prefills + decodes, and forked samples decoding over
shared prompts), so each kernel is also compiled as the model calls it. A stand-in driver reports
the target GPU, and each launch compiles its kernel and returns without running it. Register
counts come from cuobjdump (the one bundled with Triton). Writes
bench/results/compile_check-sm<arch>.json; exits 1 when a kernel does not compile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, do not interpret

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia.driver as nvidia_driver  # noqa: E402
from benchlib import RESULTS, print_table  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _TargetOnlyDriver(nvidia_driver.CudaDriver):
    """Answers the JIT's questions about the device (which GPU, which stream) for a GPU that is
    not present; loads no CUDA library. Enough to compile, not to launch."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of the one function in a cubin, from cuobjdump -res-usage (its SHARED
    is the static 1 KB the runtime reserves; the kernel's own shared memory is dynamic, in the
    kernel's metadata)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in usage.items()}


def model_steps(s: dict):
    """The model's own calls at its call sites (views of the fused qkv, the adapter's masked rows,
    a mixed prefill + decode step, a decode step over shared prompts): one decoder layer of the
    8B shape, bf16, with a LoRA adapter, run with SELFEVAL_KERNELS=triton so every op takes its
    Triton kernel (compiled, not run: its outputs are whatever memory held)."""
    from transformers import LlamaConfig

    from engine.model.config import ModelConfig
    from engine.model.llama import AttentionMetadata, LlamaForCausalLM
    from engine.model.lora import LoraConfig, init_adapter
    from kernels.cascade import find_shared_prefixes

    os.environ["SELFEVAL_KERNELS"] = "triton"  # CPU tensors take the Triton kernels
    hf = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=1,
                     num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                     head_dim=s["head_dim"], vocab_size=1024, max_position_embeddings=8192)
    cfg = ModelConfig.from_hf(hf)
    dt = getattr(torch, s["dtype"])
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).to(dt)
        model.init_rotary()
        init_adapter(model, LoraConfig(), b_std=0.01)
        model = model.to(dt)
    bs = s["block_size"]
    cache = torch.zeros(2, 1, 256 * bs, cfg.num_kv_heads, cfg.head_dim, dtype=dt)

    def step(new: list[int], ctx: list[int], tables: list[list[int]], adapter_rows: int, shared: bool):
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        pos = torch.cat([torch.arange(c - n, c) for n, c in zip(new, ctx)])
        slots = torch.cat([bt[i].long()[p // bs] * bs + p % bs
                           for i, p in enumerate(torch.arange(c - n, c) for n, c in zip(new, ctx))])
        qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
        mask = torch.zeros(len(pos), dtype=torch.bool)
        mask[len(pos) - adapter_rows:] = True
        meta = AttentionMetadata(pos, slots, bt, torch.tensor(ctx, dtype=torch.int32), qsl, bs, max(new),
                                 max(ctx), adapter_mask=mask if adapter_rows else None)
        if shared:
            meta.shared_prefixes = find_shared_prefixes(bt.numpy(), meta.context_lens.numpy(), bs)
            assert meta.shared_prefixes is not None
        with torch.no_grad():
            model(torch.zeros(len(pos), dtype=torch.long), meta, cache)

    # two prefills (one with a self-evaluation suffix under the adapter) beside three decodes
    mixed = dict(new=[40, 17, 1, 1, 1], ctx=[40, 29, 500, 130, 17],
                 tables=[list(range(0, 3)), list(range(3, 5)), list(range(5, 37)), list(range(37, 46)),
                         list(range(46, 48))], adapter_rows=8, shared=False)
    # eight samples of two prompts (512 tokens each) decoding: the cascade kernel
    prompt_a, prompt_b = list(range(48, 80)), list(range(80, 112))
    forked = dict(new=[1] * 8, ctx=[520 + i for i in range(8)],
                  tables=[(prompt_a if i < 4 else prompt_b) + [112 + i] for i in range(8)],
                  adapter_rows=0, shared=True)
    yield ("model: prefills + decodes + adapter", "1 layer, 8B shape", lambda: step(**mixed))
    yield ("model: forked samples decoding", "1 layer, 8B shape", lambda: step(**forked))


def compile_all(arch: int, toy: bool = False) -> tuple[list[dict], list[dict]]:
    """(one row per compiled kernel, one row per case that failed)."""
    driver.set_active(_TargetOnlyDriver(arch))
    compiled: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    JITFunction.run = compile_only
    # The bench fills its inputs with random values; compiling needs only the shapes and dtypes.
    randn, randn_like = torch.randn, torch.randn_like
    torch.randn = lambda *size, generator=None, **kw: torch.zeros(*size, **kw)
    torch.randn_like = lambda t, **kw: torch.zeros_like(t, **kw)
    from kernels import autotune

    launch_warps = autotune.launch_warps
    # on a GPU the elementwise kernels time each warp count: compile every one of them
    autotune.launch_warps = lambda key, launch, device, candidates=autotune.WARPS: [
        launch(w) for w in candidates][0]
    try:
        import kernel_bench

        from kernels.attention import EXTEND_CONFIGS, paged_extend_attention_triton

        rows, failures = [], []
        device = torch.device("cpu")
        s = kernel_bench.TOY if toy else kernel_bench.FULL

        def extend_cases():
            dt = getattr(torch, s["dtype"])
            nh, nkv, d, bs = s["heads"], s["kv_heads"], s["head_dim"], s["block_size"]
            for S, Q, C in s["extend"]:
                kc, vc, tables, ctx = kernel_bench.paged_cache(S, C, nkv, d, bs, dt, device)
                q = torch.zeros(S * Q, nh, d, dtype=dt)
                qsl = (torch.arange(S + 1) * Q).int()
                for config in EXTEND_CONFIGS[dt.itemsize]:
                    yield (f"extend_attention {config}", f"{S}x{Q} new, ctx{C}",
                           lambda q=q, kc=kc, vc=vc, t=tables, c=ctx, qsl=qsl, Q=Q, cf=config:
                           paged_extend_attention_triton(q, kc, vc, t, c, qsl, bs, d**-0.5, Q, config=cf))

        def every_case():
            for op, shape, _, _, impls in kernel_bench.cases(s, device):
                for name, fn in impls.items():
                    if name not in ("torch", "cuda"):
                        yield (op if name == "triton" else f"{op} [{name}]", shape, fn)
            yield from extend_cases()

        cases = every_case() if toy else itertools.chain(every_case(), model_steps(s))
        for op, shape, fn in cases:
            start = len(compiled)
            try:
                fn()
            except Exception as e:  # a compile error names the kernel and the line
                failures.append({"op": op, "shape": shape, "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(limit=3)})
                continue
            for kernel in compiled[start:]:
                meta = kernel.metadata
                usage = _resource_usage(kernel.asm["cubin"])
                rows.append({"op": op, "shape": shape, "kernel": meta.name, "num_warps": meta.num_warps,
                             "num_stages": meta.num_stages, "reg": usage.get("reg"),
                             "stack": usage.get("stack", 0), "local": usage.get("local", 0),
                             "shared": meta.shared})
        # one row per distinct compiled kernel of an op (a wrapper may launch it several times)
        seen, unique = set(), []
        for r in rows:
            key = tuple(sorted(r.items()))
            if key not in seen:
                seen.add(key)
                unique.append(r)
        return unique, failures
    finally:
        JITFunction.run = run
        autotune.launch_warps = launch_warps
        os.environ.pop("SELFEVAL_KERNELS", None)
        torch.randn, torch.randn_like = randn, randn_like


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    parser.add_argument("--toy", action="store_true",
                        help="kernel_bench's TOY shapes: float32, the dtype the GPU tests use")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    rows, failures = compile_all(args.arch, args.toy)
    print_table(rows, ["op", "kernel", "num_warps", "num_stages", "reg", "stack", "local", "shared"])
    spills = [r for r in rows if r.get("stack", 0) or r.get("local", 0)]
    print(f"\n{len(rows)} kernels compiled for sm_{args.arch}; {len(spills)} with a stack frame or "
          f"local memory; {len(failures)} failed")
    for f in failures:
        print(f"FAILED {f['op']} ({f['shape']}): {f['error'][:2000]}")
    shapes = "kernel_bench TOY (float32)" if args.toy else "kernel_bench FULL (Llama-3.1-8B, bf16)"
    record = {"target": f"sm_{args.arch}", "triton": triton.__version__, "torch": torch.__version__,
              "shapes": shapes, "kernels": rows, "failures": failures}
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compile_check-sm{args.arch}{'-toy' if args.toy else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if failures:
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
