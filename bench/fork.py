"""Fork and rollback latency against context length, and the KV memory of n=16 samples of a long
prompt forked from one prefill against 16 independent sequences.

    python bench/fork.py [--toy]

Writes bench/results/fork-<device>.json with metrics fork_us (context -> microseconds),
rollback_us, and n16_block_ratio (blocks at the peak over prompt-once + 16 responses; target <= 1.1).
"""

from __future__ import annotations

import argparse
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
from engine._core import BlockManager  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402

BLOCK = 16


def fork_latency(context: int, rounds: int = 2000) -> tuple[float, float]:
    """Median microseconds of fork (and of rolling back a 20-token suffix) at this context."""
    bm = BlockManager(2 * context // BLOCK + 16, BLOCK)
    bm.allocate(0, context)
    forks, rollbacks = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        bm.fork(0, 1)
        forks.append(time.perf_counter() - t0)
        bm.free(1)
        bm.append(0, 20)
        t0 = time.perf_counter()
        bm.truncate(0, context)
        rollbacks.append(time.perf_counter() - t0)
    return statistics.median(forks) * 1e6, statistics.median(rollbacks) * 1e6


def n16_blocks(model: str, prompt_len: int, response_len: int, device: str) -> dict:
    """Peak blocks in use for n=16 forked samples against prompt-once + 16 responses."""
    eng = Engine(
        model,
        device=device,
        block_size=BLOCK,
        num_blocks=4 * (prompt_len + 16 * response_len) // BLOCK,
        max_batch_tokens=max(2048, prompt_len + 64),
        max_model_len=prompt_len + response_len,
        cuda_graphs=False,
    )
    total = eng.num_free_blocks
    vocab = eng.model.config.vocab_size
    prompt = torch.randint(5, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(
        temperature=1.0, n=16, max_tokens=response_len, ignore_eos=True, seed=0, score=False
    )
    rid = eng.add_request(prompt, params)
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, total - eng.num_free_blocks)
    del rid
    ideal = -(-prompt_len // BLOCK) + 16 * -(-response_len // BLOCK)
    independent = 16 * -(-(prompt_len + response_len) // BLOCK)
    return {
        "peak_blocks": peak,
        "prompt_once_plus_responses": ideal,
        "independent_blocks": independent,
        "n16_block_ratio": peak / ideal,
        "saving_vs_independent": independent / peak,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a small random one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    contexts = [16, 256, 2048, 32768] if not args.toy else [16, 2048]
    rows = []
    for c in contexts:
        f, r = fork_latency(c, 200 if args.toy else 2000)
        rows.append({"context": c, "fork_us": f, "rollback_us": r})
    print_table(rows, ["context", "fork_us", "rollback_us"])
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from engine.testing.make_model import make_model

            model = str(make_model(Path(tmp) / "m", "llama", seed=0))
        mem = n16_blocks(model, 256 if args.toy else 1920, 16 if args.toy else 128, args.device)  # 2k context
    print(
        f"n=16: peak {mem['peak_blocks']} blocks vs prompt-once + responses "
        f"{mem['prompt_once_plus_responses']} "
        f"(ratio {mem['n16_block_ratio']:.3f}); 16 independent sequences: {mem['independent_blocks']}"
    )
    metrics = {
        "fork_us": {str(r["context"]): r["fork_us"] for r in rows},
        "rollback_us": {str(r["context"]): r["rollback_us"] for r in rows},
        "n16_block_ratio": mem["n16_block_ratio"],
        "n16": mem,
        "block_size": BLOCK,
    }
    path = write_results("fork", torch.device(args.device), metrics, args.out, toy=args.toy)
    print(f"-> {path}")
    return metrics


if __name__ == "__main__":
    main()
