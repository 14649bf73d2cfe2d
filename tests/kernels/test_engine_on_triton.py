"""The engine with its Triton kernels (SELFEVAL_KERNELS=triton) gives the reference path's logits."""

import pytest
import torch

pytest.importorskip("triton")

from engine import Engine  # noqa: E402


def test_prefill_and_decode_logits_match_the_reference_path(llama_dir, monkeypatch):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=128)
    ids = torch.randint(0, eng.model.config.vocab_size, (21,)).tolist()
    logits = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("SELFEVAL_KERNELS", mode)
        eng.block_manager.allocate(0, 0)
        prefill = eng.runner.run([0], [ids[:-1]])
        decode = eng.runner.run([0], [ids[-1:]])
        eng.block_manager.free(0)
        logits[mode] = torch.cat([prefill, decode])
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)
