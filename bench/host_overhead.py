"""What the host costs per decode step: everything but the model forward and the sampling math,
split by phase (engine.profiler), at batch 1, 64 and 256, and at 256 with every sample scored in
place at one checkpoint (the step that carries the suffixes, and the decode steps around it). Every
case steps with step_deltas() (streaming: text and a delta per request each step) but
b256+final-only, which steps with step() (only finished requests; text decoded when a sample ends),
and b256+general-text, which streams with OutputProcessor.decode_delta off (every request's text and
delta by the general path: what the fast path saves). b256+process-objects and b256+process are
the step of AsyncEngine's engine process, phase "emit" its pickling of the step's events for the
pipe: before, text decoded there and the deltas sent as objects (step_deltas); now (what
AsyncEngine.start does), the requests run with detokenize=False (their text is decoded in the
server's process) and the one-token deltas go as TokenDeltas rows (step_token_deltas). The -n16
rows: the same with batch / 16 requests of 16 samples each. Each pair of process rows steps its
two engines in turn (a step of one, then of the other), so both see the same moments of the
machine, whose speed drifts between runs; each evicts the other's data from the caches, so their
times run somewhat above a case run alone (their ratio is the comparison).

On the CPU a tiny model (2 layers, hidden 32) makes the forward nearly free, so the host's share
shows plainly; on a GPU the Llama-3.1-8B shape (random bf16 weights) gives host time as a share
of a real step. Host time = step wall time - forward - score - sample (the math and the read
back); every phase is timed with a device sync at its edges.

    python bench/host_overhead.py [--steps 100] [--device cpu|cuda] [--model DIR]

Writes bench/results/host_overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import pickle
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
from benchlib import model_dir, print_table, write_results  # noqa: E402

from engine import Engine, SamplingParams  # noqa: E402
from engine.profiler import StepProfiler  # noqa: E402

DEVICE_PHASES = ("forward", "score", "sample")
HOST_PHASES = ("snapshot", "schedule", "prepare", "block_copy", "to_device", "sample_prep", "update",
               "detokenize", "policy", "output", "emit")
CHECKPOINT = 8  # generated tokens at which the scored case asks every sample for its score


def tiny_model(out: Path) -> Path:
    from engine.testing.make_model import make_model

    return make_model(out / "tiny", "llama", seed=0, num_hidden_layers=2, hidden_size=32,
                      intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


def host_bench_model(model: str | None, device: str, tmp: Path) -> tuple[str, str, str]:
    """(path, load_format, label): the checkpoint given, else the 8B shape (random weights) on
    CUDA, else the tiny model whose forward is nearly free."""
    if model:
        return model, "auto", model
    if device == "cuda":
        return str(model_dir(tmp, toy=False)), "dummy", "llama-3.1-8b shape"
    return str(tiny_model(tmp)), "auto", "tiny llama (2 layers, hidden 32)"


def run_case(path: str, device: str, batch: int, steps: int, prompt_len: int, score: bool,
             load_format: str, final_only: bool = False, general_text: bool = False,
             process: str | None = None, n: int = 1) -> list[dict]:
    return run_cases(path, device, steps, prompt_len, load_format,
                     [dict(batch=batch, score=score, final_only=final_only, general_text=general_text,
                           process=process, n=n)])


def run_cases(path: str, device: str, steps: int, prompt_len: int, load_format: str,
              cases: list[dict]) -> list[dict]:
    """Each case (run_case's arguments) on an engine of its own, stepped in turn, one step each
    round: cases compared this way share the machine's moments (its speed drifts between runs)."""
    runs = [_Run(path, device, steps, prompt_len, load_format, **case) for case in cases]
    gc.collect()
    gc.freeze()  # what a process that owns its engine does (the CLI and the engine process do)
    for run in runs:  # the requests come after the freeze, as they do to an engine process
        run.start()
    for _ in range(steps):
        for run in runs:
            run.step()
    gc.unfreeze()
    return [row for run in runs for row in run.rows()]


class _Run:
    def __init__(self, path: str, device: str, steps: int, prompt_len: int, load_format: str, batch: int,
                 score: bool, final_only: bool = False, general_text: bool = False,
                 process: str | None = None, n: int = 1):
        self.device, self.score, self.batch, self.n, self.prompt_len = device, score, batch, n, prompt_len
        self.final_only, self.general_text, self.process = final_only, general_text, process
        self.name = (f"b{batch}" + (f"-n{n}" if n > 1 else "") + ("+score" if score else "")
                     + ("+final-only" if final_only else "") + ("+general-text" if general_text else "")
                     + {None: "", "rows": "+process", "objects": "+process-objects"}[process])
        self.eng = Engine(path, device=device, block_size=16, max_num_seqs=max(batch, 1),
                          max_batch_tokens=max(2048, batch * prompt_len), load_format=load_format,
                          num_blocks=batch * -(-(prompt_len + steps + 40) // 16) + 64)
        self.params = SamplingParams(temperature=1.0, max_tokens=steps + 32, ignore_eos=True, seed=0,
                                     score_at=(CHECKPOINT,) if score else (), detokenize=process != "rows",
                                     n=n)

    def start(self) -> None:
        """Add the requests, run their prompts, and set up the timed step."""
        eng, device, n, process = self.eng, self.device, self.n, self.process
        for i in range(self.batch // n):  # batch samples in all
            eng.add_request([5 + (7 * i + j) % 200 for j in range(self.prompt_len)], self.params)
        scheduler = eng.core.scheduler
        while scheduler.waiting or any(s.num_generated == 0 for s in scheduler.running):
            eng.step_deltas()  # prefill
        eng.step_deltas()
        self.prof = prof = StepProfiler(device)
        eng.profiler = prof
        if self.general_text:  # every request's text and delta by the general path (no decode_delta)
            eng.core.outputs.decode_delta = lambda request, journal, rows=None: None
        self._step = eng.step if self.final_only else eng.step_deltas  # step(): finished requests only
        if process is not None:  # what the engine process of AsyncEngine.start does: step, then pickle
            self._step = _process_step(eng, prof, rows=process == "rows")
        self.per_step = []

    def step(self) -> None:
        prof = self.prof
        before = dict(prof.phase_seconds)
        records = len(prof.steps)
        start = time.perf_counter()
        self._step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        phases = {k: v - before.get(k, 0.0) for k, v in prof.phase_seconds.items()}
        kind = prof.steps[records].kind if len(prof.steps) > records else "none"
        self.per_step.append((kind, wall, phases))

    def rows(self) -> list[dict]:
        rows = []
        for kind in ["decode", "score"] if self.score else ["decode"]:
            mine = [(w, p) for k, w, p in self.per_step if k == kind]
            if not mine:
                continue
            row = {"case": self.name, "step": kind, "steps": len(mine)}
            row["step_ms"] = statistics.median(w for w, _ in mine) * 1e3
            hosts = [w - sum(p.get(x, 0.0) for x in DEVICE_PHASES) for w, p in mine]
            row["host_ms"] = statistics.median(hosts) * 1e3
            row["host_mean_ms"] = statistics.fmean(hosts) * 1e3
            row["host_share"] = row["host_ms"] / row["step_ms"]
            for name in DEVICE_PHASES + HOST_PHASES:
                row[name] = statistics.fmean(p.get(name, 0.0) for _, p in mine) * 1e3
            row["untimed"] = row["host_mean_ms"] - sum(row[x] for x in HOST_PHASES)
            rows.append(row)
        return rows


def _process_step(eng: Engine, prof: StepProfiler, rows: bool):
    """A step of AsyncEngine's engine process: step_token_deltas (rows) or step_deltas (objects),
    then the events pickled for the pipe, under the phase "emit"."""
    def step():
        if rows:
            deltas, tokens = eng.step_token_deltas()
        else:
            deltas, tokens = eng.step_deltas(), None
        with prof.phase("emit"):
            events = [(d.request_id, d) for d in deltas]
            if tokens:
                events.append((None, ([row[0] for row in tokens.rows], tokens)))
            pickle.dumps((events, 0.0, None))
    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a checkpoint (default: tiny on CPU, 8B shape on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the host is one thread)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path, load_format, label = host_bench_model(args.model, args.device, Path(tmp))
        rows = []
        for batch in batches:
            rows += run_case(path, args.device, batch, args.steps, args.prompt_len, False, load_format)
        rows += run_case(path, args.device, max(batches), max(args.steps // 4, 2 * CHECKPOINT),
                         args.prompt_len, True, load_format)
        rows += run_case(path, args.device, max(batches), args.steps, args.prompt_len, False, load_format,
                         final_only=True)
        rows += run_case(path, args.device, max(batches), args.steps, args.prompt_len, False, load_format,
                         general_text=True)
        for n in (1, 16) if max(batches) >= 16 else (1,):  # the two ways, a step of each in turn
            rows += run_cases(path, args.device, args.steps, args.prompt_len, load_format,
                              [dict(batch=max(batches), score=False, process=process, n=n)
                               for process in ("objects", "rows")])
    print_table(rows, ["case", "step", "steps", "step_ms", "host_ms", "host_share", "forward", "sample",
                       "snapshot", "schedule", "prepare", "to_device", "sample_prep", "update", "detokenize",
                       "policy", "output", "emit", "untimed"])
    metrics = {"rows": rows, "model": label, "prompt_len": args.prompt_len, "threads": args.threads}
    for r in rows:
        if r["step"] == "decode":
            metrics[f"host_ms_{r['case']}"] = r["host_ms"]
    write_results("host_overhead", torch.device(args.device), metrics, args.out)
    return metrics


if __name__ == "__main__":
    main()
