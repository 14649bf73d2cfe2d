"""The paths without Triton against the references: rms_norm in fewer torch passes for float32
(bit for bit) and in one C++ call (engine._cpu, to float32 rounding), rotary with the cos/sin rows
gathered once a step, and RoPE + the KV store in one C++ call (bit for bit)."""

import pytest
import torch

from kernels import cpu_ops
from kernels.dispatch import reference_only
from kernels.kv_store import rotary_store_kv, rotary_store_kv_ref
from kernels.rmsnorm import rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cache, rotary_rows

needs_cpu_ext = pytest.mark.skipif(cpu_ops.extension() is None, reason="engine._cpu is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_cpu_matches_reference(dtype, tokens, with_residual, monkeypatch):
    monkeypatch.setattr(cpu_ops, "extension", lambda: None)  # the torch path: bit for bit
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


@needs_cpu_ext
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("layout", ["rows", "3d", "strided"])
def test_rms_norm_one_cpp_call_matches_reference(tokens, with_residual, layout):
    g = torch.Generator().manual_seed(7 + tokens)
    base = torch.randn(tokens, 2, 160, generator=g)
    layouts = {"rows": base[:, 0, :96].contiguous(), "3d": base[:, :, :96].contiguous(),
               "strided": base[:, 1, :96]}
    x = layouts[layout]
    residual = torch.randn(x.shape, generator=g) if with_residual else None
    weight = 1 + 0.1 * torch.randn(96, generator=g)
    fused = cpu_ops.rms_norm(x, weight, 1e-5, residual)
    assert fused is not None
    out, res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    assert out.shape == ref_out.shape and torch.equal(out, fused[0])
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(res, ref_res)  # the residual sum is one rounding either way


@needs_cpu_ext
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (6, 6, 32), (5, 1, 128)])
def test_rotary_store_kv_one_cpp_call_is_the_reference_bit_for_bit(heads, kv_heads, dim):
    # q, k, v as the model passes them (views of one fused projection), positions that repeat and
    # jump, caches poisoned where no token is written.
    g = torch.Generator().manual_seed(heads + dim)
    tokens, slots = 11, 64
    table = rotary_cache(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), 4096)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 1, 2, 4095, 7, 7, 100, 2048, 5, 6, 9])
    slot_mapping = torch.randperm(slots, generator=g)[:tokens]
    caches = [torch.full((slots, kv_heads, dim), float("nan")) for _ in range(4)]
    got = cpu_ops.rotary_store_kv(q, k, v, caches[0], caches[1], slot_mapping, positions, table)
    rows = rotary_rows(positions, table, torch.float32)
    ref = rotary_store_kv_ref(q, k, v, caches[2], caches[3], slot_mapping, positions, table, rows)
    assert torch.equal(got, ref)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))
    assert caches[0].isnan().sum() == (slots - tokens) * kv_heads * dim


@needs_cpu_ext
def test_rotary_store_kv_out_of_range_raises_and_writes_nothing():
    table = rotary_cache(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 32)
    q, k, v = torch.randn(2, 2, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    kc, vc = torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    for positions, slots, what in (([3, 32], [0, 1], "position 32"), ([3, 4], [1, 8], "slot 8"),
                                   ([-1, 4], [1, 2], "position -1")):
        with pytest.raises(IndexError, match=what):
            cpu_ops.rotary_store_kv(q, k, v, kc, vc, torch.tensor(slots), torch.tensor(positions), table)
        assert not kc.any() and not vc.any()


@needs_cpu_ext
def test_cpu_kernels_step_aside_for_autograd_other_dtypes_and_reference_only():
    x, w = torch.randn(3, 8), torch.ones(8)
    assert cpu_ops.rms_norm(x.requires_grad_(), w, 1e-5, None) is None
    with torch.no_grad():
        assert cpu_ops.rms_norm(x, w, 1e-5, None) is not None
    x = x.detach()
    assert cpu_ops.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5, None) is None
    with reference_only():
        assert cpu_ops.rms_norm(x, w, 1e-5, None) is None
        table = rotary_cache(1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), 8)
        q, kc = torch.randn(1, 1, 8), torch.zeros(4, 1, 8)
        pos = torch.tensor([1])
        assert cpu_ops.rotary_store_kv(q, q, q, kc, kc.clone(), pos, pos, table) is None
        assert rotary_store_kv(q, q, q, kc, kc.clone(), pos, pos, table) is not None  # the reference ran


@needs_cpu_ext
def test_cpu_kernels_leave_shapes_they_cannot_index_safely_to_torch():
    # every pointer and stride handed to C++ must stay inside its tensor: a mismatch goes to the
    # torch path (None here), which raises or broadcasts as torch does
    x, w = torch.randn(4, 8), torch.ones(8)
    assert cpu_ops.rms_norm(x, torch.ones(3), 1e-5, None) is None
    assert cpu_ops.rms_norm(x, w, 1e-5, torch.randn(1, 8)) is None  # torch broadcasts it
    out, _ = rms_norm(x, w, 1e-5, torch.randn(1, 8))
    assert out.shape == x.shape
    table = rotary_cache(1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), 64)
    q, k, v = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    kc, vc = torch.zeros(16, 1, 8), torch.zeros(16, 1, 8)
    pos, slots = torch.arange(4), torch.arange(4)
    bad = {
        "short positions": dict(positions=pos[:1]),
        "short slots": dict(slot_mapping=slots[:2]),
        "v cache with fewer slots": dict(v_cache=torch.zeros(8, 1, 8)),
        "k with more heads than the cache": dict(k=torch.randn(4, 4, 8), v=torch.randn(4, 4, 8)),
        "v narrower than k": dict(v=torch.randn(4, 1, 2)),
        "odd head dim": dict(q=torch.randn(4, 2, 7), k=torch.randn(4, 1, 7), v=torch.randn(4, 1, 7),
                             k_cache=torch.zeros(16, 1, 7), v_cache=torch.zeros(16, 1, 7),
                             cos_sin=torch.randn(64, 7)),
    }
    for what, change in bad.items():
        args = dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots, positions=pos, cos_sin=table)
        args.update(change)
        assert cpu_ops.rotary_store_kv(**args) is None, what
        assert not kc.any() and not vc.any(), what
    with pytest.raises((IndexError, RuntimeError)):  # the reference's own error
        rotary_store_kv(q, k, v, kc, vc, slots[:2], pos, table)


@needs_cpu_ext
@pytest.mark.parametrize("rows", [0, 1, 37, 130])
@pytest.mark.parametrize("layout", ["rows", "3d", "strided"])
def test_silu_and_mul_one_cpp_call_matches_reference(rows, layout):
    from kernels.activation import silu_and_mul, silu_and_mul_ref

    g = torch.Generator().manual_seed(rows)
    base = 4 * torch.randn(rows, 2, 200, generator=g)
    layouts = {"rows": base[:, 0, :160].contiguous(), "3d": base[:, :, :160].contiguous(),
               "strided": base[:, 1, :160]}
    x = layouts[layout]
    fused = cpu_ops.silu_and_mul(x)
    assert fused is not None and fused.shape == x.shape[:-1] + (80,)
    assert torch.equal(silu_and_mul(x), fused)
    torch.testing.assert_close(fused, silu_and_mul_ref(x), rtol=1e-6, atol=1e-6)
    assert cpu_ops.silu_and_mul(x.double()) is None and cpu_ops.silu_and_mul(x[..., :159]) is None
    assert cpu_ops.silu_and_mul(torch.randn(4, 8)[:, ::2]) is None  # no unit column stride


@needs_cpu_ext
def test_row_parallel_cpu_kernels_give_the_same_bits_on_any_number_of_threads():
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(300, 96, generator=g), torch.randn(300, 96, generator=g)
    w = torch.randn(96, generator=g)
    gate_up = torch.randn(300, 160, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((*cpu_ops.rms_norm(x, w, 1e-5, res), cpu_ops.silu_and_mul(gate_up)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))
    one_row = cpu_ops.rms_norm(x[7:8], w, 1e-5, res[7:8])[0]  # a prompt's row is a decode's row
    assert torch.equal(one_row[0], outs[0][0][7])
    assert torch.equal(cpu_ops.silu_and_mul(gate_up[7:8])[0], outs[0][2][7])


@needs_cpu_ext
def test_silu_and_mul_holds_at_large_and_tiny_gates():
    # the sigmoid comes from e^-|g| (clamped at -87): no overflow for very negative gates, 1 for
    # very positive ones, and odd widths go through the vector body and the scalar tail alike
    from kernels.activation import silu_and_mul_ref

    edges = [-1e4, -200.0, -88.0, -87.0, -20.0, -1e-3, -0.0, 0.0, 1e-30, 1e-3, 20.0, 88.0, 1e4]
    gate = torch.tensor(edges * 3)
    x = torch.cat([gate, torch.linspace(-3, 3, gate.numel())])[None]
    fused = cpu_ops.silu_and_mul(x)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, silu_and_mul_ref(x), rtol=1e-6, atol=1e-6)
    # below -87 the sigmoid is 0 (torch: 0 or a subnormal), whatever the up projection: the gate
    # never scales a floor value (-3e38 * e^-87 would be -4.9)
    x = torch.tensor([[-3e38, -1e4, -88.0, -87.5, 1.0, 1e30, 1e30, 1.0]])
    out = cpu_ops.silu_and_mul(x)[0]
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0]
