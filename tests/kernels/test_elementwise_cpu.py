"""The paths without Triton against the references, bit for bit: rms_norm in fewer passes for
float32 (with and without a residual), and rotary with the cos/sin rows gathered once a step."""

import pytest
import torch

from kernels.rmsnorm import rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cache, rotary_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_cpu_matches_reference(dtype, tokens, with_residual):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 96, generator=g).to(dtype)
    residual = torch.randn(tokens, 96, generator=g).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    out, res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res) and out.dtype == ref_out.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_rows_gathered_once_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    table = rotary_cache(1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)), 512)
    positions = torch.randint(0, 512, (19,), generator=g)
    q = torch.randn(19, 8, 64, generator=g).to(dtype)
    k = torch.randn(19, 2, 64, generator=g).to(dtype)
    rows = rotary_rows(positions, table, dtype)
    got, ref = apply_rotary(q, k, positions, table, rows), apply_rotary_ref(q, k, positions, table)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
