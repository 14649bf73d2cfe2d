"""What scoring costs in the steady state: the same sampling (same prompts, seeds, lengths) with
no scoring, and with every sample scored by the self-evaluation suffix at two checkpoints and at
its end. Tokens must be identical; the time ratio is the cost (target <= 1.10x). Each variant
runs `--reps` times, alternating, on one engine; the fastest of each is compared.

    python bench/scoring_overhead.py                 # CPU: 4-layer random model, 400-token responses
    python bench/scoring_overhead.py --device cuda   # GPU: the 8B shape, random weights

Writes bench/results/scoring_overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import model_dir, print_table, write_results  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.profiler import StepProfiler  # noqa: E402
from engine.testing.make_model import make_model  # noqa: E402


def run(eng: Engine, prompts: list[list[int]], max_tokens: int, n: int, scored: bool, stagger: int) -> tuple:
    """Request i arrives at step i * stagger (so samples reach their checkpoints and ends in
    different steps, as in serving); returns (seconds, tokens, profile summary)."""
    checkpoints = (max_tokens // 3, 2 * max_tokens // 3) if scored else ()
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, n=n, seed=1000 + i, ignore_eos=True,
                             score=scored, score_at=checkpoints) for i in range(len(prompts))]
    eng.profiler = prof = StepProfiler(eng.device)
    outs, ids, step = {}, [], 0
    start = time.perf_counter()
    while len(ids) < len(prompts) or eng.has_unfinished_requests():
        while len(ids) < len(prompts) and step >= len(ids) * stagger:
            ids.append(eng.add_request(prompts[len(ids)], params[len(ids)]))
        for out in eng.step():
            outs[out.request_id] = out
        step += 1
    seconds = time.perf_counter() - start
    eng.profiler = None
    tokens = [[s.token_ids for s in outs[i].samples] for i in ids]
    if scored:
        samples = [s for o in outs.values() for s in o.samples]
        assert all(s.score is not None and len(s.checkpoint_scores) == 2 for s in samples)
    return seconds, tokens, prof.summary()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("-n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stagger", type=int, default=25, help="steps between request arrivals")
    ap.add_argument("--hidden", type=int, default=256, help="CPU: the random model's width")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cpu":
            path, settings = make_model(Path(tmp) / "m", "llama", num_hidden_layers=4,
                                        hidden_size=args.hidden, intermediate_size=3 * args.hidden), {}
        else:
            path, settings = model_dir(Path(tmp), toy=False), {"load_format": "dummy"}
        # No score cache: the reps repeat the same seeded samples, whose scores it would hand back.
        eng = Engine(str(path), device=args.device, num_blocks=4096 if device.type == "cpu" else None,
                     score_cache_tokens=0, **settings)
        prompts = [[5 + (7 * i + j) % 200 for j in range(32 + 8 * i)] for i in range(args.prompts)]
        run(eng, prompts[:2], 8, 1, True, 0)  # warm-up
        best = {False: None, True: None}
        for _ in range(args.reps):
            for scored in (False, True):
                seconds, tokens, prof = run(eng, prompts, args.max_tokens, args.n, scored, args.stagger)
                if best[scored] is None or seconds < best[scored][0]:
                    best[scored] = (seconds, tokens, prof)
    (plain_s, plain_tokens, plain_prof), (scored_s, scored_tokens, scored_prof) = best[False], best[True]
    metrics = {
        "samples": args.prompts * args.n, "max_tokens": args.max_tokens, "scores_per_sample": 3,
        "stagger_steps": args.stagger,
        "plain_seconds": plain_s, "scored_seconds": scored_s, "scored_over_plain": scored_s / plain_s,
        "identical_tokens": plain_tokens == scored_tokens,
        "suffix_tokens": scored_prof["suffix_tokens"],
        "generated_tokens": args.prompts * args.n * args.max_tokens,
        "plain_steps": plain_prof["steps"], "scored_steps": scored_prof["steps"],
        "plain_forward_seconds": sum(v["seconds"] for v in plain_prof["forward_by_kind"].values()),
        "scored_forward_seconds": sum(v["seconds"] for v in scored_prof["forward_by_kind"].values()),
        "scored_forward_by_kind": scored_prof["forward_by_kind"],
    }
    print_table([metrics], ["samples", "max_tokens", "plain_seconds", "scored_seconds", "scored_over_plain",
                            "identical_tokens", "suffix_tokens", "plain_steps", "scored_steps"])
    model = f"4-layer {args.hidden}-wide random llama" if device.type == "cpu" else "8B shape, random"
    out = write_results("scoring_overhead", device, metrics, args.out, model=model)
    print(f"-> {out}")
    return metrics


if __name__ == "__main__":
    main()
