"""The decode-graph path's static, padded inputs give the eager path's logits: the runner in
"static" mode runs pure decode steps on the same buffers a CUDA graph replays, padded rows pointing
at the scratch block (on a GPU the same program runs with real graphs)."""

import numpy as np
import pytest
import torch

from engine import Engine
from engine.runner import ModelRunner
from engine.step_input import prepare_step

MODES = [None, "static"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(runner, bm, seq_ids, chunks, rows=None):
    return runner.execute(prepare_step(bm, seq_ids, chunks, rows))


def _program(runner, bm, ids):
    out = []
    bm.allocate(0, 0)
    out.append(_run(runner, bm, [0], [ids[:9]]))
    for child in (1, 2):
        bm.fork(0, child)
    for step in range(3):  # decode batches of 3 (bucket 4: one padded row)
        out.append(_run(runner, bm, [0, 1, 2], [[ids[9 + 3 * step + j]] for j in range(3)]))
    out.append(_run(runner, bm, [0, 1, 2], [[ids[20]], [ids[21]], [ids[22]]], np.array([2, 0])))
    bm.truncate(1, 5)
    out.append(_run(runner, bm, [1, 2], [[ids[23]], [ids[24]]]))  # bucket 2 after a rollback
    for seq in (0, 1, 2):
        bm.free(seq)
    return torch.cat(out)


def test_static_decode_inputs_match_eager(llama_dir):
    # Float32 on the GPU where there is one (CUDA graphs need it), else on the CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eng = Engine(str(llama_dir), device=device, dtype=torch.float32, block_size=4, num_blocks=64,
                 cuda_graphs=False)
    ids = torch.randint(0, eng.model.config.vocab_size, (25,)).tolist()
    results = {}
    for mode in MODES:
        runner = ModelRunner(eng.model, eng.device, eng.dtype, 64, 4, eng.max_model_len,
                             graphs=mode, max_graph_batch=8)
        if mode is not None:
            runner.kv_cache[:, :, -runner.block_size:] = 1e4  # poison the scratch block
        results[mode] = _program(runner, eng.block_manager, ids)
    assert eng.num_free_blocks == 64
    for mode in MODES[1:]:
        torch.testing.assert_close(results[mode], results[None], atol=1e-5, rtol=1e-5)


def test_static_mode_pads_to_the_bucket_and_graphs_need_cuda(llama_dir):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=16, cuda_graphs=False)
    runner = ModelRunner(eng.model, eng.device, eng.dtype, 16, 4, eng.max_model_len,
                         graphs="static", max_graph_batch=8)
    assert runner._graph_size(np.ones(3, dtype=np.int64)) == 4
    assert runner._graph_size(np.ones(9, dtype=np.int64)) is None  # past the largest bucket
    assert runner._graph_size(np.array([1, 2])) is None  # not a pure decode step
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            ModelRunner(eng.model, eng.device, eng.dtype, 16, 4, 64, graphs="cuda")
