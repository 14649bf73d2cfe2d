"""engine._cpu's paged attention (kernels.cpu_ops.paged_attention, paged_decode_attention for a
step of decodes) against the torch reference: every row's one query over its own blocks, and a
chunk's rows over the keys up to each, to float32 rounding; the same bits on one thread and on
several, for a row whatever shares its step, and on every instruction set the CPU has; indices
outside the table or cache and offsets that do not fit their contexts raise before anything is
read; layouts it cannot index safely go to the torch path; and the model runs it on its steps."""

import tempfile
from pathlib import Path

import pytest
import torch

from kernels import cpu_ops, paged_attention
from kernels.attention import paged_attention_ref
from kernels.dispatch import reference_only

needs_cpu_ext = pytest.mark.skipif(cpu_ops.extension() is None, reason="engine._cpu is not built")


def decode_batch(seed, seqs, heads, kv_heads, dim, block_size=16, blocks=64, width=9, max_ctx=None):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=g)
    tables = torch.randint(0, blocks, (seqs, width), generator=g, dtype=torch.int32)
    ctx = torch.randint(1, (max_ctx or width * block_size) + 1, (seqs,), generator=g, dtype=torch.int32)
    q = 2 * torch.randn(seqs, heads, dim, generator=g)  # scores of a few units: a peaked softmax
    return q, k_cache, v_cache, tables, ctx


@needs_cpu_ext
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 128), (6, 1, 80), (2, 2, 8), (8, 8, 7)])
@pytest.mark.parametrize("seqs", [1, 3, 33])
def test_decode_attention_matches_reference(heads, kv_heads, dim, seqs):
    q, kc, vc, tables, ctx = decode_batch(seqs + dim, seqs, heads, kv_heads, dim)
    ctx[0] = 1  # one key; the others end inside a block or on its last slot
    if seqs > 2:
        ctx[1] = 16 * 3
    qsl = torch.arange(seqs + 1, dtype=torch.int32)
    got = cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, 16, dim**-0.5)
    ref = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 16, dim**-0.5)
    assert got is not None and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)


@needs_cpu_ext
def test_decode_attention_reads_strided_queries_and_a_layer_of_the_cache():
    # q as the model hands it (rows of a wider tensor), the cache as a layer of [2, L, slots, Hkv, D]
    seqs, heads, kv_heads, dim, bs = 5, 8, 2, 64, 8
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 3, 40 * bs, kv_heads, dim, generator=g)
    wide = torch.randn(seqs, heads + 4, dim, generator=g)
    q = wide[:, 2 : 2 + heads]
    tables = torch.randperm(40, generator=g)[:30].view(seqs, 6).to(torch.int32)
    ctx = torch.tensor([1, 8, 9, 47, 48], dtype=torch.int32)
    qsl = torch.arange(seqs + 1, dtype=torch.int32)
    got = cpu_ops.paged_decode_attention(q, cache[0, 1], cache[1, 1], tables, ctx, bs, 0.125)
    ref = paged_attention_ref(q, cache[0, 1], cache[1, 1], tables, ctx, qsl, bs, 0.125)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)


@needs_cpu_ext
def test_decode_attention_is_the_same_on_any_number_of_threads():
    q, kc, vc, tables, ctx = decode_batch(11, 40, 8, 2, 64)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, 16, 0.125))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_cpu_ext
def test_decode_attention_is_row_independent():
    # a row's output does not depend on which other rows share the step (batch invariance)
    q, kc, vc, tables, ctx = decode_batch(5, 9, 8, 2, 64)
    whole = cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, 16, 0.125)
    for row in (0, 4, 8):
        alone = cpu_ops.paged_decode_attention(q[row : row + 1], kc, vc, tables[row : row + 1],
                                               ctx[row : row + 1], 16, 0.125)
        assert torch.equal(whole[row], alone[0])


@needs_cpu_ext
def test_decode_attention_out_of_range_raises_before_reading():
    q, kc, vc, tables, ctx = decode_batch(2, 3, 4, 2, 16, blocks=8, width=4)
    bad_block = tables.clone()
    bad_block[1, 0] = 8
    lens = lambda *n: torch.tensor(n, dtype=torch.int32)  # noqa: E731
    with pytest.raises(IndexError, match="block 8 outside the KV cache"):
        cpu_ops.paged_decode_attention(q, kc, vc, bad_block, lens(5, 5, 5), 16, 1.0)
    with pytest.raises(IndexError, match="context length 65 outside the block table"):
        cpu_ops.paged_decode_attention(q, kc, vc, tables, lens(1, 65, 1), 16, 1.0)
    with pytest.raises(IndexError, match="context length -1"):
        cpu_ops.paged_decode_attention(q, kc, vc, tables, lens(1, -1, 1), 16, 1.0)
    # block ids past a row's context are never read, so they are not checked
    tail = tables.clone()
    tail[:, 1:] = -7
    assert cpu_ops.paged_decode_attention(q, kc, vc, tail, torch.full((3,), 16, dtype=torch.int32), 16, 1.0) \
        is not None


@needs_cpu_ext
def test_decode_attention_leaves_what_it_cannot_run_to_torch():
    q, kc, vc, tables, ctx = decode_batch(4, 3, 4, 2, 16, blocks=8, width=4)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=tables, context_lens=ctx, block_size=16, scale=1.0)
    bad = {
        "float64": dict(q=q.double(), k_cache=kc.double(), v_cache=vc.double()),
        "int64 tables": dict(block_tables=tables.long()),
        "int64 contexts": dict(context_lens=ctx.long()),
        "a table per other rows": dict(block_tables=tables[:2]),
        "heads not a multiple of KV heads": dict(q=torch.randn(3, 3, 16)),
        "v cache of another shape": dict(v_cache=vc[:, :1]),
        "strided head dim": dict(q=torch.randn(3, 4, 32)[:, :, ::2]),
        "transposed table": dict(block_tables=tables.t().contiguous().t()),
    }
    for what, change in bad.items():
        assert cpu_ops.paged_decode_attention(**{**args, **change}) is None, what
    assert cpu_ops.paged_decode_attention(q.requires_grad_(), kc, vc, tables, ctx, 16, 1.0) is None
    q = q.detach()
    with reference_only():
        assert cpu_ops.paged_decode_attention(q, kc, vc, tables, ctx, 16, 1.0) is None
    # through kernels.paged_attention: the C++ call for decodes alone, the torch path otherwise
    qsl = torch.arange(4, dtype=torch.int32)
    ref = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 16, 1.0)
    torch.testing.assert_close(paged_attention(q, kc, vc, tables, ctx, qsl, 16, 1.0, 1, int(ctx.max())), ref,
                               rtol=2e-5, atol=2e-6)
    longest = int(ctx.max())
    as_double = paged_attention(q.double(), kc.double(), vc.double(), tables, ctx, qsl, 16, 1.0, 1, longest)
    torch.testing.assert_close(as_double, ref.double(), rtol=1e-5, atol=1e-6)


@needs_cpu_ext
def test_model_decode_steps_run_the_cpp_attention(monkeypatch):
    # the engine's decode steps reach the C++ kernel, and greedy tokens match the torch path's
    from engine import Engine, SamplingParams
    from engine.testing.make_model import make_model

    calls = []
    real = cpu_ops.paged_attention

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "m", "llama", seed=0, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]
        eng = Engine(str(path), device="cpu", dtype=torch.float32)
        eng.core.model.cpu_layers = None  # the layers' forward (forward_cpu: test_cpu_forward_loop)
        monkeypatch.setattr(cpu_ops, "paged_attention", counted)

        def tokens():
            outs = eng.run_until_done([eng.add_request(p, params) for p in prompts])
            return [o.samples[0].token_ids for o in outs]

        fast = tokens()
        assert calls and all(calls)
        monkeypatch.setenv("SELFEVAL_KERNELS", "reference")
        calls.clear()
        ref = tokens()
        assert not any(calls)
    assert fast == ref


@needs_cpu_ext
def test_decodes_beside_chunks_get_the_bits_of_a_step_of_decodes_alone():
    # a decode row's output must not depend on whether a prompt chunk shares its step (async
    # scheduling and batch invariance rely on it): mixed steps run their decodes through the kernel
    from kernels.attention import paged_attention_cpu

    q, kc, vc, tables, ctx = decode_batch(9, 4, 8, 2, 64)
    chunk = 5  # row 2 is a chunk of 5 queries, the others decode
    ctx[2] = max(int(ctx[2]), chunk)
    q_lens = [1, 1, chunk, 1]
    qsl = torch.tensor([0, 1, 2, 2 + chunk, 3 + chunk], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q_mixed = torch.randn(sum(q_lens), 8, 64, generator=g)
    decode_rows = [0, 1, 3 + chunk - 1]
    q_mixed[decode_rows] = q[[0, 1, 3]]
    mixed = paged_attention_cpu(q_mixed, kc, vc, tables, ctx, qsl, 16, 0.125)
    alone = cpu_ops.paged_decode_attention(q[[0, 1, 3]], kc, vc, tables[[0, 1, 3]], ctx[[0, 1, 3]], 16, 0.125)
    assert torch.equal(mixed[decode_rows], alone)
    ref = paged_attention_ref(q_mixed, kc, vc, tables, ctx, qsl, 16, 0.125)
    torch.testing.assert_close(mixed, ref, rtol=2e-5, atol=2e-6)


def chunk_batch(seed, q_lens, prior, heads=8, kv_heads=2, dim=64, block_size=16, blocks=80, width=9):
    """Sequences with q_lens[b] new queries after prior[b] cached tokens, over random blocks."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[: len(q_lens) * width].view(len(q_lens), width).int()
    ctx = torch.tensor([n + p for n, p in zip(q_lens, prior)], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = 2 * torch.randn(sum(q_lens), heads, dim, generator=g)
    return q, k_cache, v_cache, tables, ctx, qsl


@needs_cpu_ext
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (6, 1, 80), (4, 4, 128), (6, 2, 32), (4, 2, 16)])
@pytest.mark.parametrize("q_lens,prior", [
    ([1, 7, 1, 16], [40, 0, 3, 17]),  # decodes beside a prompt and a chunk after cached tokens
    ([33], [0]),  # a prompt alone, over blocks it fills
    ([1, 1], [0, 99]),  # decodes with offsets: the first one's only key is its own
    ([5, 0, 2], [10, 20, 0]),  # a sequence with no queries this step
])
def test_chunk_rows_match_the_reference(heads, kv_heads, dim, q_lens, prior):
    q, kc, vc, tables, ctx, qsl = chunk_batch(len(q_lens) + dim, q_lens, prior, heads, kv_heads, dim)
    got = cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl, 16, dim**-0.5)
    ref = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 16, dim**-0.5)
    assert got is not None and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)
    # through kernels.paged_attention: these chunks follow short prefixes, so this kernel
    via = paged_attention(q, kc, vc, tables, ctx, qsl, 16, dim**-0.5, max(q_lens), int(ctx.max()))
    assert torch.equal(via, got)


@needs_cpu_ext
def test_chunks_after_long_prefixes_go_to_the_torch_path(monkeypatch):
    from kernels import attention

    q, kc, vc, tables, ctx, qsl = chunk_batch(7, [1, 30, 1], [50, 10, 3])
    keys = attention.count_prefix_keys(qsl[1:] - qsl[:-1], ctx)
    assert keys == 30 * 10  # 30 rows after 10 cached keys
    calls = []
    real = cpu_ops.paged_attention
    # calls with query offsets: chunk rows in this kernel (the torch path's decodes come without)
    monkeypatch.setattr(cpu_ops, "paged_attention", lambda *a: calls.append(a[5] is not None) or real(*a))
    ref = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 16, 0.125)
    for bound, used in ((keys, True), (keys - 1, False)):  # at the bound: this kernel; past it: torch
        monkeypatch.setattr(attention, "CPU_ROWS_MAX_PREFIX_KEYS", bound)
        calls.clear()
        out = paged_attention(q, kc, vc, tables, ctx, qsl, 16, 0.125, 30, int(ctx.max()))
        assert any(calls) == used
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    # a plan given: the caller chose the torch path whatever the keys
    monkeypatch.setattr(attention, "CPU_ROWS_MAX_PREFIX_KEYS", keys)
    calls.clear()
    plan = attention.plan_cpu_attention(tables, ctx, qsl, 16)
    paged_attention(q, kc, vc, tables, ctx, qsl, 16, 0.125, 30, int(ctx.max()), plan)
    assert calls and not any(calls)


@needs_cpu_ext
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 2, 16), (3, 3, 16), (4, 1, 128)])
def test_a_row_gets_the_same_bits_whatever_shares_its_step(heads, kv_heads, dim):
    # a decode row equals itself alone; a chunk row (computed 16 rows to a tile) equals itself in a
    # chunk that starts elsewhere (so it sits elsewhere in its tile) or that nothing else joins
    q, kc, vc, tables, ctx, qsl = chunk_batch(3, [1, 37, 1], [30, 12, 5], heads, kv_heads, dim)
    scale = dim**-0.5
    whole = cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl, 16, scale)
    decodes = cpu_ops.paged_decode_attention(q[[0, 38]], kc, vc, tables[[0, 2]], ctx[[0, 2]], 16, scale)
    assert torch.equal(whole[[0, 38]], decodes)
    i32 = lambda *n: torch.tensor(n, dtype=torch.int32)  # noqa: E731
    alone = cpu_ops.paged_attention(q[1:38], kc, vc, tables[1:2], ctx[1:2], i32(0, 37), 16, scale)
    assert torch.equal(whole[1:38], alone)
    for skip in (3, 16, 30):  # the chunk's first `skip` rows already cached: the rest as a chunk
        rest = i32(0, 37 - skip)
        later = cpu_ops.paged_attention(q[1 + skip : 38], kc, vc, tables[1:2], ctx[1:2], rest, 16, scale)
        assert torch.equal(whole[1 + skip : 38], later), skip
    # the tiles' exact softmax and sums agree with a decode at the same position to rounding
    for i in (0, 17, 36):
        one = cpu_ops.paged_decode_attention(q[1 + i : 2 + i], kc, vc, tables[1:2], i32(13 + i), 16, scale)
        torch.testing.assert_close(whole[1 + i], one[0], rtol=2e-5, atol=2e-6)


def instruction_sets() -> list[str]:
    """The instruction sets engine._cpu's attention can run with on this CPU, widest first."""
    ext, found = cpu_ops.extension(), []
    best = ext.isa()
    for name in ("avx512f", "avx2", "sse2", "portable"):
        try:
            ext.set_isa(name)
        except ValueError:
            continue
        found.append(name)
    ext.set_isa("best")
    assert ext.isa() == best == found[0]
    return found


@needs_cpu_ext
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 2, 16), (6, 3, 32), (4, 1, 128), (2, 2, 256)])
def test_every_instruction_set_gives_the_same_bits(heads, kv_heads, dim):
    # each ISA's build holds 16 lanes in its own registers and adds in one order: decodes and chunk
    # rows come out the same on AVX-512, AVX2 and SSE (each one this CPU has), and match the reference
    ext = cpu_ops.extension()
    sets = instruction_sets()
    if sets != ["portable"]:  # x86-64's dispatch (other targets, or SELFEVAL_PORTABLE_CPU: one build)
        assert sets[-1] == "sse2" and len(sets) >= 2, sets
    q, kc, vc, tables, ctx, qsl = chunk_batch(11, [1, 37, 1, 5], [30, 12, 200, 0], heads, kv_heads, dim,
                                              width=16)
    d_q, d_kc, d_vc, d_tables, d_ctx = decode_batch(5, 9, heads, kv_heads, dim)
    outs = {}
    try:
        for name in sets:
            ext.set_isa(name)
            assert ext.isa() == name
            outs[name] = (cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl, 16, dim**-0.5),
                          cpu_ops.paged_decode_attention(d_q, d_kc, d_vc, d_tables, d_ctx, 16, dim**-0.5))
    finally:
        ext.set_isa("best")
    ref = paged_attention_ref(q, kc, vc, tables, ctx, qsl, 16, dim**-0.5)
    d_ref = paged_attention_ref(d_q, d_kc, d_vc, d_tables, d_ctx, torch.arange(10, dtype=torch.int32), 16,
                                dim**-0.5)
    for name, (chunks, decodes) in outs.items():
        torch.testing.assert_close(chunks, ref, rtol=2e-5, atol=2e-6, msg=name)
        torch.testing.assert_close(decodes, d_ref, rtol=2e-5, atol=2e-6, msg=name)
        assert torch.equal(chunks, outs[sets[0]][0]) and torch.equal(decodes, outs[sets[0]][1]), name


@needs_cpu_ext
def test_set_isa_refuses_what_it_cannot_run():
    ext = cpu_ops.extension()
    with pytest.raises(ValueError, match="unknown instruction set avx10"):
        ext.set_isa("avx10")
    if instruction_sets()[0] in ("avx2", "sse2"):
        with pytest.raises(ValueError, match="this CPU has no avx512f"):
            ext.set_isa("avx512f")
    assert ext.isa() == instruction_sets()[0]


@needs_cpu_ext
def test_chunk_offsets_that_do_not_fit_raise_before_reading():
    q, kc, vc, tables, ctx, qsl = chunk_batch(4, [1, 4], [3, 0])
    i32 = lambda *n: torch.tensor(n, dtype=torch.int32)  # noqa: E731
    with pytest.raises(IndexError, match="sequence 1 has 4 queries for a context of 3"):
        cpu_ops.paged_attention(q, kc, vc, tables, i32(4, 3), qsl, 16, 1.0)
    with pytest.raises(IndexError, match="sequence 0 has -1 queries"):
        cpu_ops.paged_attention(q, kc, vc, tables, ctx, i32(0, -1, 5), 16, 1.0)
    with pytest.raises(IndexError, match="query offsets do not cover the rows"):
        cpu_ops.paged_attention(q, kc, vc, tables, ctx, i32(0, 1, 4), 16, 1.0)
    with pytest.raises(IndexError, match="query offsets do not cover the rows"):
        cpu_ops.paged_attention(q, kc, vc, tables, ctx, i32(1, 1, 5), 16, 1.0)
    # offsets that go back: the first span fits its context, the second is negative; nothing is
    # written past the rows before the second is found
    big = 1 << 20
    with pytest.raises(IndexError, match="sequence 1 has -1048571 queries"):
        cpu_ops.paged_attention(q, kc, vc, tables[:, :1], i32(big, 5), i32(0, big, 5), big, 1.0)
    # a block size that is not positive is not indexed at all
    assert cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl, 0, 1.0) is None
    assert cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl, -1, 1.0) is None
    # offsets of another dtype or length are left to the torch path
    assert cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl.long(), 16, 1.0) is None
    assert cpu_ops.paged_attention(q, kc, vc, tables, ctx, qsl[:2], 16, 1.0) is None
    # one query per sequence, but not as many rows as sequences
    assert cpu_ops.paged_attention(q, kc, vc, tables, ctx, None, 16, 1.0) is None


def test_count_prefix_keys_counts_the_cached_keys_chunk_rows_read():
    import numpy as np

    from kernels.attention import count_prefix_keys

    q_lens, ctx = [1, 5, 3, 0, 2], [40, 5, 10, 7, 300]
    brute = sum(c - q for q, c in zip(q_lens, ctx) if q > 1 for _ in range(q))
    assert brute == 0 + 3 * 7 + 2 * 298
    assert count_prefix_keys(np.array(q_lens, dtype=np.int32), np.array(ctx, dtype=np.int32)) == brute
    assert count_prefix_keys(torch.tensor(q_lens).int(), torch.tensor(ctx).int()) == brute
