"""kernels.lora on float32 CPU tensors (lora_cpu): lora_ref's bits, rows off the mask untouched,
and the reference wherever it does not apply."""

import importlib

import pytest
import torch

from kernels.dispatch import reference_only
from kernels.lora import lora, lora_cpu, lora_ref


def _operands(tokens, in_dim, out_dim, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, in_dim, generator=g), torch.randn(tokens, out_dim, generator=g),
            torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g), g)


@pytest.mark.parametrize("tokens,in_dim,out_dim,rank",
                         [(1, 64, 96, 8), (37, 100, 200, 16), (513, 192, 576, 16)])
@pytest.mark.parametrize("pattern", ["none", "one", "suffix", "scattered", "all"])
def test_cpu_lora_gives_the_reference_bits(tokens, in_dim, out_dim, rank, pattern):
    x, y, a, b, g = _operands(tokens, in_dim, out_dim, rank, tokens)
    ids = torch.arange(tokens)
    mask = {"none": ids < 0, "one": ids == tokens // 2, "suffix": ids >= tokens - 23,
            "scattered": torch.rand(tokens, generator=g) < 0.3, "all": ids >= 0}[pattern]
    expect = lora_ref(x, y.clone(), a, b, 1.7, mask)
    out = y.clone()
    assert lora(x, out, a, b, 1.7, mask) is out
    assert torch.equal(out, expect)
    assert torch.equal(out[~mask], y[~mask])


def test_cpu_lora_adds_into_a_column_slice_with_a_uint8_mask():
    # the adapter adds into q/k/v column slices of a fused projection
    x, _, a, b, g = _operands(40, 32, 48, 4, 1)
    fused = torch.randn(40, 3 * 48, generator=g)
    mask = (torch.rand(40, generator=g) < 0.4).to(torch.uint8)
    expect = fused.clone()
    lora_ref(x, expect[:, 48:96], a, b, 2.0, mask.bool())
    out = fused.clone()
    lora_cpu(x, out[:, 48:96], a, b, 2.0, mask)
    assert torch.equal(out, expect)


def test_cpu_lora_on_a_transposed_input_gives_the_reference_bits():
    g = torch.Generator().manual_seed(5)
    for tokens, in_dim in ((7, 2), (9, 33), (64, 48)):
        x = torch.randn(in_dim, tokens, generator=g).T  # strides (1, tokens)
        a, b = torch.randn(3, in_dim, generator=g), torch.randn(5, 3, generator=g)
        y = torch.randn(tokens, 5, generator=g)
        for mask in (torch.ones(tokens, dtype=torch.bool), torch.arange(tokens) % 2 == 0):
            assert torch.equal(lora(x, y.clone(), a, b, 1.3, mask), lora_ref(x, y.clone(), a, b, 1.3, mask))


def test_the_reference_runs_where_the_cpu_path_does_not_apply(monkeypatch):
    calls = []
    lora_mod = importlib.import_module("kernels.lora")  # the package exports the function `lora`
    monkeypatch.setattr(lora_mod, "lora_cpu", lambda *a: calls.append(1) or lora_cpu(*a))
    x, y, a, b, _ = _operands(9, 16, 24, 4, 2)
    mask = torch.arange(9) > 4
    lora(x, y, a, b, 1.0, mask)
    assert calls == [1]
    lora(x.double(), y.double(), a.double(), b.double(), 1.0, mask)  # another dtype
    with reference_only():
        lora(x, y, a, b, 1.0, mask)
    a_grad = a.clone().requires_grad_()
    lora(x, y.clone(), a_grad, b, 1.0, mask)  # training: autograd through the reference
    longer = torch.cat([torch.zeros(5, dtype=torch.bool), torch.ones(9, dtype=torch.bool)])
    with pytest.raises(IndexError):  # a mask longer than the rows: lora_ref's error, nothing added
        lora(x, y.clone(), a, b, 1.0, longer)
    assert calls == [1]
