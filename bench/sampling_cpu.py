"""The CPU sampler (kernels.sampling.sample_cpu) at serving's vocabularies, against the reference
(sample_ref) and against sample_cpu with its uniforms hashed in torch int64 ops (its path without
engine._cpu), tokens checked equal across all three. Temperature 0.8 on every row (logits of std
4), no top-k / top-p; then top-k 50 and top-p 0.9 at the first two shapes (both cut where a sort of
the vocabulary says: a cutoff without the sort, from torch.topk, was tried and differed from the
sort's where a top_p lands within rounding of a prefix's mass, 49 of 1,600 rows at top_p 0.99).

    python bench/sampling_cpu.py [--shapes 256x384,16x32000,64x128256] [--threads 1]

Writes bench/results/sampling_cpu-cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)
sys.path.append(str(_HERE))
import torch  # noqa: E402
from benchlib import print_table, time_ms, write_results  # noqa: E402

from kernels import cpu_ops  # noqa: E402
from kernels.sampling import sample_cpu, sample_ref  # noqa: E402


def case(batch: int, vocab: int, top_k: int, top_p: float, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    args = (4 * torch.randn(batch, vocab, generator=g), torch.full((batch,), 0.8),
            torch.full((batch,), top_k, dtype=torch.int64), torch.full((batch,), top_p),
            torch.randint(0, 2**62, (batch,), generator=g), torch.full((batch,), 7, dtype=torch.int64))
    cpu = torch.device("cpu")
    ref = sample_ref(*args)[0]
    row = {"shape": f"{batch}x{vocab}", "filters": "top-k 50, top-p 0.9" if top_k else "none"}
    row["ref_ms"] = time_ms(lambda: sample_ref(*args), cpu, reps=reps, warmup=1)
    with mock.patch.object(cpu_ops, "sampling_uniforms", lambda *a: None):  # the torch int64 hash
        same_torch = sample_cpu(*args)[0].tolist() == ref.tolist()
        row["torch_hash_ms"] = time_ms(lambda: sample_cpu(*args), cpu, reps=reps, warmup=1)
    same = sample_cpu(*args)[0].tolist() == ref.tolist()
    row["cpu_ms"] = time_ms(lambda: sample_cpu(*args), cpu, reps=reps, warmup=1)
    row["speedup_vs_torch_hash"] = row["torch_hash_ms"] / row["cpu_ms"]
    row["tokens_equal"] = same and same_torch
    row["extension"] = cpu_ops.extension() is not None
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="256x384,16x32000,64x128256")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = [case(b, v, 0, 1.0, args.reps) for b, v in shapes]
    rows += [case(*shape, 50, 0.9, args.reps) for shape in shapes[:2]]
    print_table(rows, ["shape", "filters", "ref_ms", "torch_hash_ms", "cpu_ms", "speedup_vs_torch_hash",
                       "tokens_equal"])
    if not all(r["tokens_equal"] for r in rows):
        raise SystemExit("tokens differ from sample_ref")
    metrics = {"rows": rows, "threads": args.threads}
    write_results("sampling_cpu", torch.device("cpu"), metrics, args.out)
    return metrics


if __name__ == "__main__":
    main()
