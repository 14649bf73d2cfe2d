"""Token-masked LoRA: the Triton kernel against the reference, and rows off the mask untouched
bit for bit."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.lora import lora_ref, lora_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,in_dim,out_dim,rank", [(1, 64, 96, 8), (37, 100, 200, 16),
                                                        (70, 64, 130, 5)])
@pytest.mark.parametrize("pattern", ["none", "suffix", "scattered", "all"])
def test_lora_matches_reference_on_masked_rows_only(dtype, tokens, in_dim, out_dim, rank, pattern):
    g = torch.Generator().manual_seed(tokens + rank)
    x = torch.randn(tokens, in_dim, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, out_dim, generator=g).to(DEVICE, dtype)
    a = (0.1 * torch.randn(rank, in_dim, generator=g)).to(DEVICE, dtype)
    b = (0.1 * torch.randn(out_dim, rank, generator=g)).to(DEVICE, dtype)
    mask = {
        "none": torch.zeros(tokens, dtype=torch.bool),
        "suffix": torch.arange(tokens) >= tokens - 5,
        "scattered": torch.rand(tokens, generator=g) < 0.3,
        "all": torch.ones(tokens, dtype=torch.bool),
    }[pattern].to(DEVICE)
    out = lora_triton(x, y.clone(), a, b, 0.5, mask)
    ref = lora_ref(x, y.clone(), a, b, 0.5, mask)
    assert torch.equal(out[~mask], y[~mask])  # off the mask: bit-identical
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if mask.any():
        assert not torch.allclose(out[mask].float(), y[mask].float())


def test_lora_updates_a_strided_output_view():
    # The adapter adds into q/k/v slices of a fused projection: y is a column slice.
    x = torch.randn(9, 32, device=DEVICE)
    fused = torch.randn(9, 3 * 48, device=DEVICE)
    a, b = torch.randn(4, 32, device=DEVICE), torch.randn(48, 4, device=DEVICE)
    mask = torch.arange(9, device=DEVICE) >= 6
    expect = fused.clone()
    lora_ref(x, expect[:, 48:96], a, b, 2.0, mask)
    lora_triton(x, fused[:, 48:96], a, b, 2.0, mask)
    torch.testing.assert_close(fused, expect, atol=1e-4, rtol=1e-4)
