"""What the AsyncEngine's loop thread costs: the same requests through Engine.generate (one
blocking call) and through AsyncEngine.generate (all streaming concurrently from one event loop),
and the cost of one cross-thread hand-off (loop.call_soon_threadsafe + queue.put_nowait).

    python bench/async_overhead.py [--requests 64] [--max-tokens 32]

Writes bench/results/async_overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import model_dir, write_results  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402


def handoff_us(count: int = 20000) -> float:
    """Microseconds per delta handed from a worker thread to an asyncio consumer."""

    async def main():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def produce():
            for i in range(count):
                loop.call_soon_threadsafe(queue.put_nowait, i)

        start = time.perf_counter()
        threading.Thread(target=produce).start()
        for _ in range(count):
            await queue.get()
        return (time.perf_counter() - start) / count * 1e6

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(model_dir(Path(tmp), toy=True))
        prompts = [torch.randint(5, 300, (int(torch.randint(8, 64, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(args.requests)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        eng = Engine(path, device=args.device, enable_prefix_caching=False)
        eng.generate(prompts[:4], params)  # warm-up
        aeng = AsyncEngine(eng)

        async def run_all():
            async def one(p):
                async for delta in aeng.generate(p, params):
                    if delta.finished:
                        return delta.output
            return await asyncio.gather(*(one(p) for p in prompts))

        sync_s = async_s = float("inf")
        for _ in range(args.repeats):  # alternated, fastest of each kept
            start = time.perf_counter()
            sync_out = eng.generate(prompts, params)
            sync_s = min(sync_s, time.perf_counter() - start)
            start = time.perf_counter()
            async_out = asyncio.run(run_all())
            async_s = min(async_s, time.perf_counter() - start)
        aeng.shutdown()
    same = [o.samples[0].token_ids for o in sync_out] == [o.samples[0].token_ids for o in async_out]
    metrics = {"requests": args.requests, "max_tokens": args.max_tokens, "sync_seconds": sync_s,
               "async_seconds": async_s, "async_over_sync": async_s / sync_s, "same_tokens": same,
               "handoff_us": handoff_us()}
    print(f"{args.requests} requests x {args.max_tokens} tokens: Engine.generate {sync_s:.3f}s, "
          f"AsyncEngine {async_s:.3f}s ({metrics['async_over_sync']:.3f}x); same tokens: {same}; "
          f"one cross-thread hand-off {metrics['handoff_us']:.1f} us")
    print(f"-> {write_results('async_overhead', torch.device(args.device), metrics, args.out)}")
    return metrics


if __name__ == "__main__":
    main()
