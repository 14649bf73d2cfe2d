"""Dispatch by measurement: where two kernels do the same op (Triton and CUDA), the first call of
each shape bucket times both and the faster one serves that bucket from then on."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

_winners: dict[tuple, str] = {}


def bucket(n: int) -> int:
    """Next power of two: shapes in one bucket share a winner."""
    return 1 << max(0, int(n) - 1).bit_length()


def fastest(key: tuple, candidates: dict[str, Callable[[], object]], device: torch.device,
            reps: int = 5) -> str:
    """Name of the fastest candidate for key, timing each once per key (after one warm-up run).
    A candidate that raises ValueError (it does not support the shape) drops out. Never times
    inside a CUDA graph capture: the first candidate serves until an eager call decides."""
    if key in _winners:
        return _winners[key]
    cuda = device.type == "cuda"
    if cuda and torch.cuda.is_current_stream_capturing():
        return next(iter(candidates))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {}
    for name, run in candidates.items():
        try:
            run()
        except ValueError:
            continue
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            run()
        sync()
        times[name] = time.perf_counter() - start
    if not times:
        raise ValueError(f"no kernel supports {key}")
    _winners[key] = min(times, key=times.get)
    return _winners[key]


def winners() -> dict[tuple, str]:
    """Every decision made so far (benchmarks report them)."""
    return dict(_winners)


WARPS = (4, 8, 16)


def launch_warps(key: tuple, launch: Callable[[int], object], device: torch.device,
                 candidates: tuple[int, ...] = WARPS) -> object:
    """launch(num_warps) with the fastest of candidates for key on a GPU (the first elsewhere):
    for the elementwise kernels, whose best warp count depends on the row width and the GPU.
    launch must be idempotent (it may run once per candidate on the first call of a key)."""
    if device.type != "cuda":
        return launch(candidates[0])
    runs = {str(w): (lambda w=w: launch(w)) for w in candidates}
    return launch(int(fastest(key, runs, device)))
