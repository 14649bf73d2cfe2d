"""The engine with its Triton kernels (SELFEVAL_KERNELS=triton) gives the reference path's logits:
prefill, a mixed batch of a decode and a forked suffix extend, then a pure decode batch (split-K)."""

import pytest
import torch

pytest.importorskip("triton")

from engine import Engine  # noqa: E402
from engine.step_input import prepare_step


def _program(eng, ids):
    bm = eng.block_manager

    def run(ids, chunks):
        return eng.runner.execute(prepare_step(bm, ids, chunks))

    bm.allocate(0, 0)
    out = [run([0], [ids[:20]])]
    bm.fork(0, 1)
    out.append(run([0, 1], [ids[20:21], ids[21:27]]))  # a decode beside a 6-token extend
    out.append(run([0, 1], [ids[27:28], ids[28:29]]))  # pure decode
    bm.truncate(1, 20)
    out.append(run([1], [ids[29:31]]))
    bm.free(0)
    bm.free(1)
    return torch.cat(out)


def test_engine_logits_match_the_reference_path(llama_dir, monkeypatch):
    # Float32 on the GPU where there is one, else on the CPU under the Triton interpreter.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eng = Engine(str(llama_dir), device=device, dtype=torch.float32, block_size=4, num_blocks=128)
    ids = torch.randint(0, eng.model.config.vocab_size, (31,)).tolist()
    logits = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("SELFEVAL_KERNELS", mode)
        logits[mode] = _program(eng, ids)
    assert eng.num_free_blocks == 128
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_bf16_logits_match_the_cpu_path(llama_dir):
    # bf16 weights, cache and kernels (with CUDA graphs on the decode steps) against float32 on CPU.
    ids = torch.randint(0, 300, (31,)).tolist()
    cpu = _program(Engine(str(llama_dir), block_size=4, num_blocks=128, dtype=torch.float32), ids)
    gpu_engine = Engine(str(llama_dir), device="cuda", dtype=torch.bfloat16, block_size=4,
                        num_blocks=128, max_num_seqs=8)
    gpu = _program(gpu_engine, ids).cpu()
    err = (gpu - cpu).norm() / cpu.norm()
    assert err < 2e-2, f"relative error {err:.3g}"
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.9


def test_samples_of_one_prompt_decode_through_cascade_attention(llama_dir, monkeypatch):
    # 4 samples forked from a 300-token prompt share its blocks: their decode steps take the
    # cascade path (prefix read once, tails apart) and give the reference path's logits.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eng = Engine(str(llama_dir), device=device, dtype=torch.float32, block_size=16, num_blocks=64,
                 cuda_graphs=False)
    ids = torch.randint(0, eng.model.config.vocab_size, (310,)).tolist()
    bm = eng.block_manager
    logits = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("SELFEVAL_KERNELS", mode)
        bm.allocate(0, 0)
        eng.runner.execute(prepare_step(bm, [0], [ids[:300]]))
        for child in (1, 2, 3):
            bm.fork(0, child)
        out = [eng.runner.execute(prepare_step(bm, [0, 1, 2, 3], [[t] for t in ids[300 + i:304 + i]]))
               for i in range(3)]
        logits[mode] = torch.cat(out)
        for seq in range(4):
            bm.free(seq)
    assert eng.runner.cascade_steps == 3
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fraction,expect_cascade", [(0.0, True), (1e9, False)])
def test_a_graph_decode_step_leaves_its_graph_only_when_cascade_saves_enough(llama_dir, monkeypatch,
                                                                           fraction, expect_cascade):
    # Where a graph would replay the step ("static": the graph path's buffers, eager), cascade takes
    # the step only when the KV reads it saves reach CASCADE_MIN_SAVED_FRACTION of the weights.
    import engine.runner as runner_mod

    monkeypatch.setenv("SELFEVAL_KERNELS", "triton")
    monkeypatch.setattr(runner_mod, "CASCADE_MIN_SAVED_FRACTION", fraction)
    eng = Engine(str(llama_dir), dtype=torch.float32, block_size=16, num_blocks=64, cuda_graphs=False)
    runner = runner_mod.ModelRunner(eng.model, eng.runner.device, torch.float32, 64, 16, 512,
                                    graphs="static", max_graph_batch=8)
    bm = eng.block_manager
    ids = torch.randint(0, eng.model.config.vocab_size, (304,)).tolist()
    bm.allocate(0, 0)
    runner.execute(prepare_step(bm, [0], [ids[:300]]))
    for child in (1, 2, 3):
        bm.fork(0, child)
    runner.execute(prepare_step(bm, [0, 1, 2, 3], [[t] for t in ids[300:304]]))
    assert runner.cascade_steps == int(expect_cascade)
