"""Makes the bundled testbed checkpoint from nothing, on CPU or GPU:

    python -m engine.testbed.build --out build/stage1 --task edges ... --until pretrain
    python -m engine.testbed.build --out engine/testbed/model --task edges --init-from build/stage1 ...

(the bundled model's two commands in full: engine/testbed/model/RECIPE.json)

1. pretrain the base model (engine.testbed.pretrain) on generated problems of --task (arith:
   chained addition, engine.testbed.task; paths: a path in a small graph, engine.testbed.paths;
   edges: the same with one token per edge, engine.testbed.edges, the bundled model's), for
   arith a --direct-frac share of them answered with no working (a second habit, which fails on long
   problems); with --check-steps, go on with half of each batch the answer-checking task (synthetic
   right/corrupted solutions, "right"/"wrong"; off by default: for arith 300 steps left the model
   checking at chance); for the path tasks, --attempt-frac mixes in wrong attempts (another arm
   followed to its end) and --check-wrong attempt makes them the checking task's wrong answers;
   --partial-frac asks the checking task of paths cut short too (edges), --levels picks the
   problem shapes; --init-from goes on from an existing checkpoint;
2. measure its greedy and sampled accuracy on held-out problems;
3. `build-data`: N samples per training prompt, verifier rewards, targets per --targets, mid-generation
   prefixes completed k times;
4. `train` the self-evaluation adapter into OUT/adapter;
5. write OUT/RECIPE.json: the command, seeds, steps, data sizes, timings and final metrics.
Stages whose outputs exist are skipped (--redo to rebuild)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from engine.api import Engine
from engine.sampling import SamplingParams, seeds_per_prompt
from engine.testbed import TASKS, load_task
from engine.testbed.demo import HELD_OUT_SEED
from engine.testbed.pretrain import PretrainConfig, pretrain
from engine.train.data import TARGETS, build_examples, write_jsonl
from engine.train.trainer import TrainConfig, train

DATA_SEED = 1


def accuracy(model_dir: Path, task, n: int, temperature: float, device: str, seed: int = 7) -> dict:
    """Accuracy of one sample per held-out problem at the demo's levels, overall and by level."""
    eng = Engine(str(model_dir), device=device, seed=seed)
    recs = [p.record() for p in task.problems(n, HELD_OUT_SEED, task.DEMO_LEVELS)]
    outs = eng.chat(
        [[{"role": "user", "content": r["prompt"]}] for r in recs],
        seeds_per_prompt(SamplingParams(temperature=temperature, max_tokens=task.MAX_TOKENS, seed=seed), n),
    )
    right = [(r["level"], task.verify(r, o.samples[0].text)) for r, o in zip(recs, outs)]
    levels = sorted({lv for lv, _ in right})
    by_level = {str(lv): sum(ok for x, ok in right if x == lv) / sum(x == lv for x, _ in right)
                for lv in levels}
    return {"acc": sum(ok for _, ok in right) / n, "by_level": by_level}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="scratch directory for the data (default OUT/../build)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", choices=sorted(TASKS), default="arith")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=64, help="pretraining batch")
    ap.add_argument("--layers", type=int, default=4, help="base model depth (hidden 192, 6 heads)")
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--direct-frac", type=float, default=None,
                    help="arith: share of pretraining solutions that answer with no working (default 0.35)")
    ap.add_argument("--check-frac", type=float, default=0.0,
                    help="share of the pretraining batch that is the answer-checking task from the start")
    ap.add_argument("--check-steps", type=int, default=0)
    ap.add_argument("--attempt-frac", type=float, default=0.0,
                    help="paths/edges: share of pretraining solutions that are wrong attempts "
                         "(another arm to its end)")
    ap.add_argument("--check-wrong", choices=["corrupt", "attempt"], default="corrupt",
                    help="the checking task's wrong solutions: the task's corrupt or its attempt")
    ap.add_argument("--check-questions", type=int, default=1,
                    help="how many phrasings of the checking question pretraining asks "
                         "(1: 'Check every line.' only)")
    ap.add_argument("--partial-frac", type=float, default=0.0,
                    help="edges: share of the checking task asked of a path cut short "
                         "(does it lead on to the target?)")
    ap.add_argument("--levels", default=None,
                    help="pretraining levels, comma-separated (default: the task's PRETRAIN_LEVELS, "
                         "else all)")
    ap.add_argument("--init-from", default=None,
                    help="start the pretrain stage from this checkpoint (its shape and tokenizer win)")
    ap.add_argument("--data-prompts", type=int, default=384)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--checkpoints", default=None, help="mid-generation lengths (default: the task's)")
    ap.add_argument("--completions", type=int, default=3)
    ap.add_argument("--targets", choices=TARGETS, default="win-tie",
                    help="see engine.train.data.win_tie_against")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16, help="adapter rank")
    ap.add_argument("--lr", type=float, default=2e-3, help="adapter learning rate")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--until", choices=["pretrain", "data", "adapter"], default="adapter",
                    help="stop after this stage (e.g. build the data here, train the adapter on a GPU)")
    args = ap.parse_args(argv)
    task = load_task(args.task)
    if args.direct_frac is None:
        args.direct_frac = 0.35 if hasattr(task.Problem, "direct") else 0.0  # the habit is arith's
    elif args.direct_frac and not hasattr(task.Problem, "direct"):
        ap.error(f"--direct-frac: the {args.task} task has no direct answers")
    checkpoints = ([int(c) for c in args.checkpoints.split(",") if c] if args.checkpoints is not None
                   else list(task.DATA_CHECKPOINTS))
    levels = tuple(int(lv) for lv in args.levels.split(",")) if args.levels else None
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "build"
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "RECIPE.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.exists() and not args.redo else {}
    if not args.redo and recipe.get("task", "arith") != args.task and (out / "model.safetensors").exists():
        ap.error(f"{out} holds a model of the {recipe.get('task', 'arith')} task: --redo to rebuild it")
    recipe["command"] = "python -m engine.testbed.build " + " ".join(argv or sys.argv[1:])
    recipe["task"] = args.task

    def save() -> None:  # after every stage, so an interrupted build keeps what it made
        recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")

    if args.redo or not (out / "model.safetensors").exists():
        cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, num_layers=args.layers,
                             lr=args.pretrain_lr, threads=0, direct_frac=args.direct_frac, task=args.task,
                             check_frac=args.check_frac, attempt_frac=args.attempt_frac,
                             check_wrong=args.check_wrong, check_questions=args.check_questions,
                             partial_frac=args.partial_frac, levels=levels)
        recipe["pretrain"] = pretrain(out, cfg, args.device, init_from=args.init_from)
        if args.init_from:
            recipe["pretrain"]["init_from"] = str(args.init_from)
        recipe.pop("pretrain_check", None)
        save()
    if "pretrain_check" not in recipe and args.check_steps:
        cfg = PretrainConfig(steps=args.check_steps, batch_size=args.batch_size, lr=1e-3, warmup=20,
                             check_frac=0.5, seed=3, threads=0, task=args.task,
                             attempt_frac=args.attempt_frac, check_wrong=args.check_wrong,
                             check_questions=args.check_questions, partial_frac=args.partial_frac,
                             levels=levels)
        recipe["pretrain_check"] = pretrain(out, cfg, args.device, init_from=out)
        recipe["pretrain_check"]["note"] = "continued from the pretrain stage's checkpoint"
        for stage in ("base_metrics", "data", "adapter"):
            recipe.pop(stage, None)
        save()
    base = recipe.setdefault("base_metrics", {})
    if "greedy_acc" not in base:
        greedy = accuracy(out, task, args.eval_problems, 0.0, args.device)
        sample = accuracy(out, task, args.eval_problems, 1.0, args.device)
        base["greedy_acc"], base["greedy_by_level"] = greedy["acc"], greedy["by_level"]
        base["sample_acc_t1"], base["sample_by_level"] = sample["acc"], sample["by_level"]
        base["held_out_problems"] = args.eval_problems
        base["levels"] = task.DEMO_LEVELS
        save()
    print("base model:", base, flush=True)
    if args.until == "pretrain":
        return 0

    data = work / "adapter-data.jsonl"
    if args.redo or not data.exists() or "data" not in recipe:
        start = time.perf_counter()
        eng = Engine(str(out), device=args.device, seed=DATA_SEED)
        recs = [p.record() for p in task.problems(args.data_prompts, DATA_SEED, task.DATA_LEVELS)]
        params = SamplingParams(temperature=1.0, max_tokens=task.MAX_TOKENS, seed=DATA_SEED)
        count = write_jsonl(
            build_examples(
                eng,
                recs,
                reward=task.verify,
                n=args.n,
                params=params,
                completions=args.completions,
                checkpoints=checkpoints,
                targets=args.targets,
            ),
            data,
        )
        recipe["data"] = {
            "prompts": args.data_prompts,
            "seed": DATA_SEED,
            "levels": task.DATA_LEVELS,
            "n": args.n,
            "checkpoints": checkpoints,
            "completions": args.completions,
            "targets": args.targets,
            "temperature": 1.0,
            "examples": count,
            "seconds": round(time.perf_counter() - start, 1),
        }
        save()
    if args.until == "data":
        print(f"data: {recipe['data']['examples']} examples in {data}")
        return 0
    if args.redo or not (out / "adapter" / "adapter.safetensors").exists() or "adapter" not in recipe:
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")
        cfg = TrainConfig(
            rank=args.rank, alpha=2 * args.rank, lr=args.lr, epochs=args.epochs, batch_size=32, eval_frac=0.1,
            device=args.device
        )
        start = time.perf_counter()
        report = train(str(out), str(data), str(out / "adapter"), cfg)
        recipe["adapter"] = {
            "train": asdict(cfg),
            "report": report,
            "seconds": round(time.perf_counter() - start, 1),
        }
    save()
    print(json.dumps(recipe.get("adapter", {}).get("report", {}).get("held_out_calibration"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
