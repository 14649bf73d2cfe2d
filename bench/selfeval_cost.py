"""What self-evaluation costs: scoring every running sequence of a batch at a checkpoint (the real
suffix, appended in place and rolled back) against one decode step of the same batch, against the
naive way (re-run the whole sequence plus suffix without cache), and against copying the cache
(transformers DynamicCache deepcopy, then the suffix).

    python bench/selfeval_cost.py            # GPU: Llama-3.1-8B shape, bf16
    python bench/selfeval_cost.py --toy      # any device, a small random model

Writes bench/results/selfeval_cost-<device>.json: score_over_decode and naive_over_score, each a
map "batch/context" -> ratio (targets: <= 2 and >= 20x at 2k context).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import model_dir, print_table, time_ms, write_results  # noqa: E402

from engine import Engine  # noqa: E402
from engine.step_input import prepare_step  # noqa: E402


def _fill(eng: Engine, seq_ids: list[int], context: int, chunk: int = 8192) -> None:
    """Prefill every sequence to `context` random tokens, a few sequences per forward."""
    vocab = eng.model.config.vocab_size
    for sid in seq_ids:
        eng.block_manager.allocate(sid, 0)
        for lo in range(0, context, chunk):
            n = min(chunk, context - lo)
            chunk_ids = torch.randint(5, vocab, (n,)).tolist()
            eng.runner.execute(prepare_step(eng.block_manager, [sid], [chunk_ids], []))


def measure_copy(hf, vocab: int, suffix: list[int], batch: int, context: int, reps: int, dev) -> float:
    """transformers' way: deep-copy the DynamicCache of the prompt, then run the suffix on it."""
    prompt = torch.randint(5, vocab, (batch, context), device=dev)
    with torch.no_grad():
        cache = hf(prompt, use_cache=True).past_key_values
        suf = torch.tensor([suffix] * batch, device=dev)

        def copy_then_score():
            hf(suf, past_key_values=copy.deepcopy(cache), use_cache=True)

        return time_ms(copy_then_score, dev, max(2, reps // 4))


NAIVE_MAX_TOKENS = 1 << 16


def measure(eng: Engine, batch: int, context: int, reps: int) -> dict:
    bm = eng.block_manager

    def run(seq_ids, chunks, rows=None, adapter=None):
        return eng.runner.execute(prepare_step(bm, seq_ids, chunks, rows, adapter))

    ids = list(range(batch))
    _fill(eng, ids, context)
    suffix = list(eng.spec.suffix_after(7))
    dev = eng.device

    def decode():
        run(ids, [[7]] * batch)
        for s in ids:
            bm.truncate(s, context)

    def score():  # the pending token plus the suffix, score rows only, then roll back
        rows = [(i + 1) * (len(suffix) + 1) - 1 for i in range(batch)]
        run(ids, [[7] + suffix] * batch, rows, [len(suffix)] * batch)
        for s in ids:
            bm.truncate(s, context)

    fresh = list(range(batch, 2 * batch))

    def naive():  # the whole sequence plus suffix, no cache
        tokens = [7] * context + suffix
        for s in fresh:
            bm.allocate(s, 0)
        run(fresh, [tokens] * batch, [(i + 1) * len(tokens) - 1 for i in range(batch)])
        for s in fresh:
            bm.free(s)

    out = {"decode_ms": time_ms(decode, dev, reps), "score_ms": time_ms(score, dev, reps)}
    enough = bm.num_free_blocks >= batch * -(-(context + len(suffix)) // bm.block_size)
    # The re-run grows as batch x context (2M tokens at 256 x 8k: minutes a rep on an 8B model);
    # 64k tokens covers the 2k target up to batch 32.
    enough = enough and batch * context <= NAIVE_MAX_TOKENS
    out["naive_ms"] = time_ms(naive, dev, max(2, reps // 4)) if enough else None
    for s in ids:
        bm.free(s)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the 8B shape, random)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    pairs = lambda s: [tuple(map(int, bc.split(":"))) for bc in s.split(",")]  # noqa: E731
    ap.add_argument("--grid", default=None, type=pairs,
                    help="batch:context pairs, e.g. 64:512,64:2048,16:8192 (default: batch 1-256 x 512-8k)")
    args = ap.parse_args(argv)
    toy = args.toy or args.device == "cpu"
    device = torch.device(args.device)
    reps = 5 if toy else 20
    grid = [(1, 64), (4, 256)] if toy else [(b, c) for b in (1, 16, 64, 256) for c in (512, 2048, 8192)]
    grid = args.grid or grid
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(model_dir(Path(tmp), toy))
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        fmt = "auto" if (args.model or toy) else "dummy"
        eng = Engine(
            path,
            device=args.device,
            dtype=dtype,
            load_format=fmt,
            cuda_graphs=False,
            max_batch_tokens=1 << 16,
        )
        rows = []
        for batch, context in grid:
            blocks = batch * (-(-(context + 64) // eng.block_manager.block_size)) * 2
            if blocks > eng.block_manager.num_blocks:
                rows.append({"batch": batch, "context": context, "skipped": "KV cache too small"})
                continue
            r = measure(eng, batch, context, reps)
            r.update(batch=batch, context=context, score_over_decode=r["score_ms"] / r["decode_ms"])
            if r["naive_ms"]:
                r["naive_over_score"] = r["naive_ms"] / r["score_ms"]
            rows.append(r)
        vocab, suffix = eng.model.config.vocab_size, list(eng.spec.suffix_after(7))
        suffix_tokens = len(eng.spec.suffix_ids)
        del eng  # the copy baseline runs alone: transformers holds its own weights and cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from transformers import AutoConfig, AutoModelForCausalLM

        if args.model or toy:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        else:  # random weights of the shape, made on the device (its timing does not depend on them)
            with torch.device(device):
                hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()
        for r in rows:
            if "score_ms" in r and r["batch"] * r["context"] <= 16384:
                r["copy_ms"] = measure_copy(hf, vocab, suffix, r["batch"], r["context"], reps, device)
                r["copy_over_score"] = r["copy_ms"] / r["score_ms"]
        del hf
    cols = [
        "batch",
        "context",
        "decode_ms",
        "score_ms",
        "naive_ms",
        "copy_ms",
        "score_over_decode",
        "naive_over_score",
        "copy_over_score",
        "skipped",
    ]
    print_table(rows, cols)
    key = lambda r: f"{r['batch']}/{r['context']}"  # noqa: E731
    metrics = {
        "score_over_decode": {key(r): r["score_over_decode"] for r in rows if "score_over_decode" in r},
        "naive_over_score": {key(r): r["naive_over_score"] for r in rows if "naive_over_score" in r},
        "copy_over_score": {key(r): r["copy_over_score"] for r in rows if "copy_over_score" in r},
        "rows": rows,
        "suffix_tokens": suffix_tokens,
    }
    path = write_results("selfeval_cost", device, metrics, args.out, toy=toy)
    print(f"-> {path}")
    return metrics


if __name__ == "__main__":
    main()
