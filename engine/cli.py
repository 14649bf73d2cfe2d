"""`selfeval` command line: generate and score with a local checkpoint directory; build the
adapter's training data and train it."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _engine(args):
    from engine import Engine
    from engine.config import EngineConfig

    return Engine(EngineConfig(model=args.model, device=args.device, block_size=args.block_size,
                               adapter=getattr(args, "adapter", None)))


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


def cmd_build_data(args) -> int:
    from engine import SamplingParams
    from engine.train.data import build_examples, load_verifier, read_prompts, reward_model_fn, write_jsonl

    if (args.verifier is None) == (args.reward_model is None):
        print("selfeval: error: give exactly one of --verifier or --reward-model", file=sys.stderr)
        return 2
    eng = _engine(args)
    records = read_prompts(args.prompts)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    examples = build_examples(
        eng, records, reward=load_verifier(args.verifier) if args.verifier else None,
        batch_reward=reward_model_fn(args.reward_model, args.device) if args.reward_model else None,
        n=args.n, checkpoints=[int(c) for c in args.checkpoints.split(",") if c],
        completions=args.completions, params=params, chat=not args.no_chat)
    count = write_jsonl(examples, args.out)
    print(f"wrote {count} examples for {len(records)} prompts to {args.out}")
    return 0


def cmd_train(args) -> int:
    from engine.train.trainer import TrainConfig, train

    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, lr=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, eval_frac=args.eval_frac,
                      save_every=args.save_every, seed=args.seed, device=args.device)
    report = train(args.model, args.data, args.out, cfg)
    print(json.dumps(report["held_out_calibration"], indent=2))
    print(f"adapter and calibration.json written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from engine.testbed import BUNDLED
    from engine.testbed.demo import run_demo

    problems = args.problems or (300 if args.full else 60)
    run_demo(args.out, model=args.model or BUNDLED, adapter=args.adapter, num_problems=problems,
             seed=args.seed, device=args.device)
    print(f"results.json and plots written to {args.out}")
    return 0


def cmd_profile(args) -> int:
    from engine.testbed import BUNDLED
    from engine.testbed.profile import run_profile

    run_profile(args.model or str(BUNDLED), args.policy, args.out, args.problems, args.n, args.threshold,
                args.checkpoint, args.keep, args.max_tokens, args.device, args.adapter, trace=args.trace)
    print(f"profile.json and profile.png written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selfeval", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
        p.add_argument("--device", default="cpu")
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--prompt", action="append", required=True, help="repeat for several")
        p.add_argument("--adapter", default=None, help="self-evaluation adapter directory")

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

    b = sub.add_parser("build-data", help="sample, reward and target examples for the adapter")
    b.add_argument("--model", required=True)
    b.add_argument("--device", default="cpu")
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    b.add_argument("--out", required=True, help="output JSONL")
    b.add_argument("--verifier", help="module:function(record, response_text) -> reward")
    b.add_argument("--reward-model", help="local sequence-classification checkpoint")
    b.add_argument("-n", type=int, default=8)
    b.add_argument("--checkpoints", default="16,32", help="mid-generation lengths, comma-separated")
    b.add_argument("--completions", type=int, default=4, help="completions per prefix")
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-chat", action="store_true", help="prompts are raw text, no chat template")
    b.set_defaults(func=cmd_build_data)

    t = sub.add_parser("train", help="train the self-evaluation adapter")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="JSONL from build-data")
    t.add_argument("--out", required=True, help="adapter directory")
    t.add_argument("--device", default="cpu")
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--eval-frac", type=float, default=0.1)
    t.add_argument("--save-every", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the paper's results in miniature on the bundled testbed model")
    d.add_argument("--out", default="selfeval-demo", help="directory for results.json and plots")
    d.add_argument("--full", action="store_true", help="the larger run (more problems)")
    d.add_argument("--problems", type=int, default=None)
    d.add_argument("--model", default=None, help="default: the bundled testbed model")
    d.add_argument("--adapter", default=None, help="default: the model's adapter/ directory")
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("profile", help="time by phase and tokens saved for a policy workload")
    pr.add_argument("--policy", required=True, choices=["best-of-n", "adaptive", "prune"])
    pr.add_argument("--model", default=None, help="default: the bundled testbed model")
    pr.add_argument("--adapter", default=None)
    pr.add_argument("--problems", type=int, default=32)
    pr.add_argument("-n", type=int, default=8)
    pr.add_argument("--threshold", type=float, default=0.8)
    pr.add_argument("--checkpoint", type=int, default=16)
    pr.add_argument("--keep", type=float, default=0.25)
    pr.add_argument("--max-tokens", type=int, default=64)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--trace", action="store_true", help="also write a torch.profiler Chrome trace")
    pr.add_argument("--out", default="selfeval-profile")
    pr.set_defaults(func=cmd_profile)

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
