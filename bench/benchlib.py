"""What every benchmark shares: the device's measured ceilings, timing, and the results file
(bench/results/<bench>-<device>.json holding device, torch, triton, date and metrics)."""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def interpret_triton_without_gpu() -> None:
    """Call before importing triton: without a GPU its kernels run in the interpreter."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo): CPU figures move with it (a 300 MB L3 holds a model
    that a 32 MB one streams from memory)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def last_level_cache() -> str | None:
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    try:
        return (caches[-1] / "size").read_text().strip() if caches else None
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    llc = last_level_cache()
    try:  # the instruction set engine._cpu's attention runs with (the widest the CPU has)
        from engine import _cpu

        isa = f", {_cpu.isa()}"
    except ImportError:
        isa = ""
    return f"cpu ({os.cpu_count()} cores, {cpu_model()}{f', last-level cache {llc}' if llc else ''}{isa})"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    found = re.search(r"\b([abhlv]\d{2,3}|gb?\d{3})\b", name)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn: CUDA events on a GPU, a synchronised host clock elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device-memory bandwidth in bytes/s: a large copy, bytes read plus written."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in FLOP/s (8192^3 on a GPU, 1024^3 elsewhere)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=10)
    return 2 * n**3 / (ms * 1e-3)


def write_results(
    bench: str, device: torch.device, metrics: dict, out_dir: Path | str | None = None, **extra
) -> Path:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}-{device_slug(device)}.json"
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    record = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,  # the baseline of several benches
        "date": datetime.date.today().isoformat(),
        "metrics": metrics,
        **extra,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


def model_dir(out: Path, toy: bool) -> Path:
    """A checkpoint directory to benchmark: the 8B shape (config + tokenizer, weights filled at
    load with load_format="dummy") or, for toy runs, a small random checkpoint."""
    from engine.testing.make_model import make_model, make_tokenizer

    out = Path(out)
    if toy:
        return make_model(out / "toy", "llama", seed=0)
    from transformers import LlamaConfig

    tok = make_tokenizer()
    path = out / "llama-3.1-8b-shape"
    LlamaConfig(**LLAMA_8B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    return path
