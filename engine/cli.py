"""`selfeval` command line: generate and score with a local checkpoint directory."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _engine(args):
    from engine import Engine

    return Engine(args.model, device=args.device, block_size=args.block_size)


def cmd_generate(args) -> int:
    from engine import SamplingParams

    eng = _engine(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, n=args.n, seed=args.seed,
                            ignore_eos=args.ignore_eos, score=True if args.score else None)
    prompts = args.prompt
    start = time.perf_counter()
    if args.chat:
        outs = eng.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
    else:
        outs = eng.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(o.stats.generated_tokens for o in outs)
    for prompt, out in zip(prompts, outs):
        print(f"=== prompt: {prompt!r}")
        for s in out.samples:
            score = "" if s.score is None else f" score={s.score:.3f}"
            best = " (best)" if s is out.best and len(out.samples) > 1 else ""
            print(f"--- sample {s.index}{best} [{s.finish_reason}, {len(s.token_ids)} tokens{score}]")
            print(s.text)
    print(f"\n{len(outs)} requests, {generated} tokens in {elapsed:.2f}s "
          f"({generated / max(elapsed, 1e-9):.1f} tok/s); KV blocks free: {eng.num_free_blocks}")
    return 0


def cmd_score(args) -> int:
    eng = _engine(args)
    if len(args.prompt) != len(args.response):
        print("give one --response per --prompt", file=sys.stderr)
        return 2
    scores = eng.score(args.prompt, args.response)
    print(json.dumps([{"prompt": p, "response": r, "score": s}
                      for p, r, s in zip(args.prompt, args.response, scores)], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selfeval", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
        p.add_argument("--device", default="cpu")
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--prompt", action="append", required=True, help="repeat for several")

    g = sub.add_parser("generate", help="sample responses (n>1 forks samples off one prefill)")
    common(g)
    g.add_argument("-n", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--score", action="store_true", help="self-evaluate every sample")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", help="self-evaluation score of (prompt, response) pairs")
    common(s)
    s.add_argument("--response", action="append", required=True)
    s.set_defaults(func=cmd_score)

    m = sub.add_parser("make-model", help="write a small random checkpoint (tests, examples)")
    m.add_argument("out")
    m.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=lambda a: _make_model(a))

    args = ap.parse_args(argv)
    from engine.errors import EngineError

    try:
        return args.func(args)
    except EngineError as e:
        print(f"selfeval: error: {e}", file=sys.stderr)
        return 2


def _make_model(args) -> int:
    from engine.testing.make_model import make_model

    print(f"wrote a random {args.arch} checkpoint to {make_model(args.out, args.arch, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
