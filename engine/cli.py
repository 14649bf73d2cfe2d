"""`selfeval` command line: generate and score with a local checkpoint directory; serve it over
HTTP; build the adapter's training data and train it."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time


def _config(args):
    from pathlib import Path

    from engine.config import EngineConfig

    adapter = getattr(args, "adapter", None)
    if adapter is None and (Path(args.model) / "adapter").is_dir():  # as `demo` does
        adapter = str(Path(args.model) / "adapter")
    return EngineConfig(model=args.model, device=args.device, block_size=args.block_size, adapter=adapter,
                        load_format=getattr(args, "load_format", "auto"),
                        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                        async_scheduling=getattr(args, "async_scheduling", False),
                        **({"score_cache_tokens": args.score_cache_tokens}
                           if getattr(args, "score_cache_tokens", None) is not None else {}))


def _engine(args):
    from engine import Engine

    return Engine(_config(args))


def policy_list(text: str) -> str:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in ("best-of-n", "prune", "adaptive")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"policies are among best-of-n, prune, adaptive; got {text!r}")
    return ",".join(names)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed_int(text: str) -> int:
    value = int(text)
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


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
        print("selfeval: error: give one --response per --prompt", file=sys.stderr)
        return 2
    prompts = [eng.render_chat([{"role": "user", "content": p}]) for p in args.prompt] if args.chat \
        else args.prompt
    scores = eng.score(prompts, args.response)
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
        completions=args.completions, params=params, chat=not args.no_chat, targets=args.targets)
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

    policies = [p.strip() for p in (args.policies or args.policy or "best-of-n,prune,adaptive").split(",")]
    run_profile(args.model or str(BUNDLED), policies, args.out, args.problems, args.n, args.threshold,
                args.checkpoint, args.keep, args.max_tokens, args.device, args.adapter, seed=args.seed,
                trace=args.trace, prompts=args.prompts, verifier=args.verifier, ignore_eos=args.ignore_eos,
                temperature=args.temperature)
    print(f"profile.json and profile.png written to {args.out}")
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from engine.server import build_app
    except ImportError as e:
        print(f"selfeval: error: serving needs FastAPI and uvicorn ({e}); "
              f"pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import os

    from engine.async_engine import AsyncEngine

    if int(os.environ.get("RANK", "0")) > 0:  # a torchrun rank > 0: hold a shard, serve nothing
        from engine.tensor_parallel import run_worker

        run_worker(_config(args))
        return 0
    engine = AsyncEngine.start(_config(args)) if args.engine_process else AsyncEngine(_engine(args))
    name = args.served_model_name or args.model.rstrip("/").rsplit("/", 1)[-1]
    from pathlib import Path

    from engine.policies.combined import FILE, CombinedScorer

    adapter = _config(args).adapter
    combined = (CombinedScorer.load(Path(adapter) / FILE)
                if adapter is not None and (Path(adapter) / FILE).exists() else None)
    app = build_app(engine, name, max_waiting=args.max_waiting, combined=combined)
    gc.collect()
    gc.freeze()  # this process serves until it exits: keep full collections off what it built
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selfeval", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def common(p):
        p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
        p.add_argument("--prompt", action="append", required=True, help="repeat for several")
        p.add_argument("--adapter", default=None,
                       help="self-evaluation adapter directory (default: the model's adapter/, if any)")
        p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")

    g = sub.add_parser("generate", help="sample responses (n>1 forks samples off one prefill)",
                       formatter_class=fmt)
    common(g)
    g.add_argument("-n", type=positive_int, default=1, help="samples per prompt")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=nonnegative_int, default=0, help="0 disables")
    g.add_argument("--max-tokens", type=nonnegative_int, default=64, help="tokens per sample")
    g.add_argument("--seed", type=seed_int, default=None, help="reproducible samples")
    g.add_argument("--ignore-eos", action="store_true", help="generate max-tokens whatever the model says")
    g.add_argument("--score", action="store_true", help="self-evaluate every sample")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", help="self-evaluation score of (prompt, response) pairs",
                       formatter_class=fmt)
    common(s)
    s.add_argument("--response", action="append", required=True, help="one per --prompt")
    s.set_defaults(func=cmd_score)

    b = sub.add_parser("build-data", help="sample, reward and target examples for the adapter",
                       formatter_class=fmt)
    b.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    b.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    b.add_argument("--out", required=True, help="output JSONL")
    b.add_argument("--verifier", help="module:function(record, response_text) -> reward")
    b.add_argument("--reward-model", help="local sequence-classification checkpoint")
    b.add_argument("-n", type=positive_int, default=8, help="samples per prompt")
    b.add_argument("--checkpoints", default="16,32", help="mid-generation lengths, comma-separated")
    b.add_argument("--completions", type=positive_int, default=4, help="completions per prefix")
    b.add_argument("--targets", choices=["win-tie", "win-half", "reward"], default="win-tie",  # data.TARGETS
                   help="win-tie: the share of the prompt's other samples this one is not worse than (the "
                   "paper); win-half: ties count half; reward: the verifier's value (P(right))")
    b.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    b.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per sample")
    b.add_argument("--seed", type=seed_int, default=0, help="reproducible samples")
    b.add_argument("--no-chat", action="store_true", help="prompts are raw text, no chat template")
    b.set_defaults(func=cmd_build_data)

    t = sub.add_parser("train", help="train the self-evaluation adapter", formatter_class=fmt)
    t.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    t.add_argument("--data", required=True, help="JSONL from build-data")
    t.add_argument("--out", required=True, help="adapter directory")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--rank", type=positive_int, default=16, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha/rank)")
    t.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    t.add_argument("--epochs", type=positive_int, default=3, help="passes over the data")
    t.add_argument("--batch-size", type=positive_int, default=16, help="examples per step")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    t.add_argument("--eval-frac", type=float, default=0.1, help="held-out fraction for calibration")
    t.add_argument("--save-every", type=nonnegative_int, default=0,
                   help="checkpoint every N steps (0: end only)")
    t.add_argument("--seed", type=seed_int, default=0, help="data order and init")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the paper's experiments in miniature on the bundled testbed model, "
                       "against the simple baselines", formatter_class=fmt)
    d.add_argument("--out", default="selfeval-demo", help="directory for results.json and plots")
    d.add_argument("--full", action="store_true", help="the larger run (more problems)")
    d.add_argument("--problems", type=positive_int, default=None,
                   help="held-out problems (default: 60, or 300 with --full)")
    d.add_argument("--model", default=None, help="default: the bundled testbed model")
    d.add_argument("--adapter", default=None, help="default: the model's adapter/ directory")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--seed", type=seed_int, default=0, help="sampling seed")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("profile", help="policies side by side against best-of-n on the same prompts and "
                        "seeds: measured savings, time by phase, the cost of scoring", formatter_class=fmt)
    pr.add_argument("--policies", default=None, type=policy_list,
                    help="comma-separated, among best-of-n, prune, adaptive (best-of-n, the baseline, "
                         "always runs) [default: all three]")
    pr.add_argument("--policy", default=None, choices=["best-of-n", "adaptive", "prune"],
                    help="one policy beside the baseline (same as --policies POLICY)")
    pr.add_argument("--model", default=None, help="default: the bundled testbed model")
    pr.add_argument("--adapter", default=None, help="default: the model's adapter/")
    pr.add_argument("--prompts", default=None, help="a JSONL file, one {\"prompt\": ...} per line "
                    "(default: testbed problems)")
    pr.add_argument("--verifier", default=None, help="module:function(record, text) -> float for "
                    "accuracy (default: the testbed's, with testbed prompts)")
    pr.add_argument("--problems", type=positive_int, default=32, help="testbed prompts")
    pr.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    pr.add_argument("--ignore-eos", action="store_true", help="every sample runs to --max-tokens")
    pr.add_argument("--seed", type=seed_int, default=0, help="seed of the per-sample seeds")
    pr.add_argument("-n", type=positive_int, default=8,
                    help="samples (best-of-n, prune) or the cap (adaptive)")
    pr.add_argument("--threshold", type=float, default=0.8, help="adaptive: stop at this score")
    pr.add_argument("--checkpoint", type=positive_int, default=None,
                    help="prune: score at this many tokens (default: the testbed task's middle "
                         "checkpoint, 16 with --prompts)")
    pr.add_argument("--keep", type=fraction, default=0.25, help="prune: fraction kept")
    pr.add_argument("--max-tokens", type=positive_int, default=None,
                    help="tokens per sample (default: the testbed task's, 64 with --prompts)")
    pr.add_argument("--device", default="cpu", help="cpu or cuda")
    pr.add_argument("--trace", action="store_true", help="also write a torch.profiler Chrome trace")
    pr.add_argument("--out", default="selfeval-profile", help="output directory")
    pr.set_defaults(func=cmd_profile)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI, uvicorn)", formatter_class=fmt)
    sv.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    sv.add_argument("--adapter", default=None,
                    help="self-evaluation adapter directory (default: the model's adapter/, if any)")
    sv.add_argument("--device", default="cpu", help="cpu or cuda")
    sv.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    sv.add_argument("--served-model-name", default=None, help="the model name clients ask for "
                    "(default: the model directory's name)")
    sv.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="dummy: random weights of the checkpoint's shape (benchmarks without weights)")
    sv.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                    help="split the model over this many processes (started here; under torchrun its ranks)")
    sv.add_argument("--async-scheduling", action="store_true",
                    help="launch each decode step before the host has the last one's tokens (overlaps "
                         "host and GPU work; same outputs; one process only)")
    sv.add_argument("--score-cache-tokens", type=int, default=None,
                    help="tokens of scored sequences whose self-evaluation scores are kept for reuse "
                         "(default 1M; 0 turns the score cache off)")
    sv.add_argument("--max-waiting", type=positive_int, default=None,
                    help="answer 503 while this many requests wait (default: no bound)")
    sv.add_argument("--log-level", default="warning", help="uvicorn log level")
    sv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                    help="run the engine's step loop in a process of its own (else a thread of the "
                         "server's: the HTTP handlers then compete with it for the GIL)")
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("make-model", help="write a small random checkpoint (tests, examples)",
                       formatter_class=fmt)
    m.add_argument("out", help="directory to write")
    m.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"], help="architecture")
    m.add_argument("--seed", type=seed_int, default=0, help="weight init seed")
    m.set_defaults(func=lambda a: _make_model(a))

    args = ap.parse_args(argv)
    from engine.errors import EngineError

    try:
        return args.func(args)
    except (EngineError, OSError) as e:  # the user's input or files: a message, not a traceback
        print(f"selfeval: error: {e}", file=sys.stderr)
        return 2


def _make_model(args) -> int:
    from engine.testing.make_model import make_model

    print(f"wrote a random {args.arch} checkpoint to {make_model(args.out, args.arch, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
