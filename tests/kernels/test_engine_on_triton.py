"""The engine with its Triton kernels (SELFEVAL_KERNELS=triton) gives the reference path's logits:
prefill, a mixed batch of a decode and a forked suffix extend, then a pure decode batch (split-K)."""

import pytest
import torch

pytest.importorskip("triton")

from engine import Engine  # noqa: E402


def _program(eng, ids):
    bm, run = eng.block_manager, eng.runner.run
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
    eng = Engine(str(llama_dir), block_size=4, num_blocks=128)
    ids = torch.randint(0, eng.model.config.vocab_size, (31,)).tolist()
    logits = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("SELFEVAL_KERNELS", mode)
        logits[mode] = _program(eng, ids)
    assert eng.num_free_blocks == 128
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)
