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


def _masks(tokens: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.arange(tokens)
    runs = torch.zeros(tokens, dtype=torch.bool)
    for end in (tokens // 3, tokens // 2 + 7, tokens):  # suffix runs ending three packed sequences
        runs[max(0, end - 23):end] = True
    return {
        "one_row": ids == tokens // 2,
        "first_and_last": (ids == 0) | (ids == tokens - 1),
        "every_8th": ids % 8 == 3,
        "random_eighth": torch.rand(tokens, generator=g) < 0.125,
        "suffix_runs": runs,
        "last_eighth": ids >= tokens - max(1, tokens // 8),
        "all": torch.ones(tokens, dtype=torch.bool),
    }


def _operands(tokens, in_dim, out_dim, rank, dtype, ab_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_dim, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, out_dim, generator=g).to(DEVICE, dtype)
    a = (torch.randn(rank, in_dim, generator=g) / in_dim**0.5).to(DEVICE, ab_dtype)
    b = (0.1 * torch.randn(out_dim, rank, generator=g)).to(DEVICE, ab_dtype)
    return x, y, a, b, g


def _check(x, y, a, b, mask, scale=0.5, tol=1e-4):
    out = lora_triton(x, y.clone(), a, b, scale, mask)
    ref = lora_ref(x, y.clone(), a, b, scale, mask)
    assert torch.equal(out[~mask], y[~mask])  # off the mask: bit-identical
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("pattern", list(_masks(8, torch.Generator())))
@pytest.mark.parametrize("tokens,in_dim,out_dim,rank", [(300, 300, 200, 16), (1300, 1100, 1000, 12)])
def test_lora_gathers_sparse_and_scattered_masks(pattern, tokens, in_dim, out_dim, rank):
    # 1300 tokens span three 512-row chunks (the last one partial), 1100 inputs five K splits (the
    # last one partial), 1000 outputs two column groups: every tile edge of the gathered kernels.
    x, y, a, b, g = _operands(tokens, in_dim, out_dim, rank, torch.float32, torch.float32, tokens)
    _check(x, y, a, b, _masks(tokens, g)[pattern].to(DEVICE))


@pytest.mark.parametrize("rank", [8, 12, 16, 64])
@pytest.mark.parametrize("dtype,ab_dtype", [(torch.float32, torch.float32),
                                            (torch.float16, torch.float16),
                                            (torch.float16, torch.float32),
                                            (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float16)]
                         + ([(torch.bfloat16, torch.bfloat16)] if DEVICE == "cuda" else []))
def test_lora_ranks_and_dtypes(rank, dtype, ab_dtype):
    # x in the model's dtype with the adapter's float32 weights (a fresh adapter) multiplies in
    # float32. bf16 x bf16 only on a GPU: the Triton interpreter's bf16 dot is wrong.
    x, y, a, b, g = _operands(600, 260, 130, rank, dtype, ab_dtype, rank)
    mask = (torch.rand(600, generator=g) < 0.125).to(DEVICE)
    _check(x, y, a, b, mask, tol=TOL[dtype if dtype != torch.float32 else ab_dtype])


def test_lora_with_no_tokens_or_no_masked_row_changes_nothing():
    x, y, a, b, _ = _operands(0, 64, 96, 16, torch.float32, torch.float32)
    assert lora_triton(x, y, a, b, 0.5, torch.zeros(0, dtype=torch.bool, device=DEVICE)) is y
    x, y, a, b, _ = _operands(700, 64, 96, 16, torch.float16, torch.float16)
    out = lora_triton(x, y.clone(), a, b, 0.5, torch.zeros(700, dtype=torch.bool, device=DEVICE))
    assert torch.equal(out, y)


def test_lora_adds_into_a_column_slice_of_a_fused_output():
    # As on the model's qkv: y = fused[:, q:q+kv] has unit column stride and a longer row stride;
    # x a column slice too. Everything outside the masked rows of the slice stays bit-identical.
    x_full, fused, a, b, g = _operands(530, 2 * 200, 3 * 144, 12, torch.float16, torch.float16)
    x = x_full[:, 100:300]
    a = a[:, :200].contiguous()
    b = b[:144].contiguous()
    mask = _masks(530, g)["suffix_runs"].to(DEVICE)
    expect = fused.clone()
    lora_ref(x, expect[:, 144:288], a, b, 2.0, mask)
    out = fused.clone()
    view = out[:, 144:288]
    assert view.stride() == (3 * 144, 1)
    assert lora_triton(x, view, a, b, 2.0, mask) is view
    assert torch.equal(out[~mask], fused[~mask])
    assert torch.equal(out[:, :144], fused[:, :144]) and torch.equal(out[:, 288:], fused[:, 288:])
    torch.testing.assert_close(out.float(), expect.float(), atol=3e-3, rtol=3e-3)


def test_lora_reads_and_writes_transposed_views_with_a_uint8_mask():
    _, _, a, b, g = _operands(90, 70, 50, 8, torch.float32, torch.float32)
    x = torch.randn(70, 90, generator=g).to(DEVICE).T  # strides (1, 90)
    y = torch.randn(50, 90, generator=g).to(DEVICE).T
    mask = (torch.rand(90, generator=g) < 0.3).to(DEVICE)
    out = y.clone().T.contiguous().T  # the same transposed layout
    assert lora_triton(x, out, a, b, 0.5, mask.to(torch.uint8)) is out
    assert torch.equal(out[~mask], y[~mask])
    torch.testing.assert_close(out, lora_ref(x, y.clone(), a, b, 0.5, mask), atol=1e-4, rtol=1e-4)


def test_lora_is_deterministic():
    # The K-split partials are summed in a fixed order (no atomics): the same bits every run.
    x, y, a, b, g = _operands(1100, 2000, 300, 16, torch.float16, torch.float16)
    mask = (torch.rand(1100, generator=g) < 0.125).to(DEVICE)
    first = lora_triton(x, y.clone(), a, b, 0.5, mask)
    assert torch.equal(lora_triton(x, y.clone(), a, b, 0.5, mask), first)



def test_lora_triton_rejects_shapes_that_do_not_fit():
    x, y = torch.randn(6, 32), torch.zeros(6, 48)
    a, b = torch.randn(4, 32), torch.randn(48, 4)
    mismatches = (dict(mask=torch.ones(5, dtype=torch.bool)), dict(y=torch.zeros(6, 40)),
                  dict(a=torch.randn(4, 30)))
    for bad in mismatches:
        args = dict(x=x, y=y, a=a, b=b, mask=torch.ones(6, dtype=torch.bool)) | bad
        with pytest.raises(ValueError, match="do not fit"):
            lora_triton(args["x"], args["y"], args["a"], args["b"], 0.5, args["mask"])
