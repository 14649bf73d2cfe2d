"""The packed CPU linear against F.linear: exact packing round trip, the same products over a
sweep of rows (both paths: the batched matmul, and from VIEWS_MIN_ROWS rows each block into its
output columns), widths, parts and biases, and a model that swaps its projections in unchanged."""

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import VIEWS_MIN_ROWS, pack_weight, packed_linear, unpack_weight


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("rows", [0, 1, 7, 16, 300, VIEWS_MIN_ROWS, 700])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(parts, rows, bias):
    g = torch.Generator().manual_seed(rows * 10 + parts)
    for out_features, in_features in ((64, 32), (768, 512), (2752, 96)):
        w = torch.randn(out_features, in_features, generator=g)
        b = torch.randn(out_features, generator=g) if bias else None
        x = torch.randn(rows, in_features, generator=g)
        packed = pack_weight(w, parts)
        assert packed.shape == (parts, in_features, out_features // parts) and packed.is_contiguous()
        assert torch.equal(unpack_weight(packed), w)
        y = packed_linear(x, packed, b)
        assert y.shape == (rows, out_features) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_parts_must_divide_the_outputs():
    with pytest.raises(ValueError, match="equal parts"):
        pack_weight(torch.zeros(10, 4), 4)


def test_a_packed_model_computes_what_the_plain_one_does(llama_dir):
    from engine.model.llama import AttentionMetadata, PackedLinear, pack_linears
    from engine.model.loader import load_model

    plain, _ = load_model(str(llama_dir), torch.device("cpu"), torch.float32)
    packed, _ = load_model(str(llama_dir), torch.device("cpu"), torch.float32)
    pack_linears(packed, 2)
    layer = packed.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PackedLinear)
    assert isinstance(layer.mlp.down_proj, PackedLinear)
    assert torch.equal(layer.mlp.gate_up_proj.weight, plain.layers[0].mlp.gate_up_proj.weight)
    ids = torch.randint(0, plain.config.vocab_size, (2 * 9,))
    meta = AttentionMetadata(positions=torch.arange(9).repeat(2),
                             slot_mapping=torch.zeros(18, dtype=torch.int64),
                             block_tables=torch.zeros(2, 1, dtype=torch.int32),
                             context_lens=torch.full((2,), 9, dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 9, 18], dtype=torch.int32), block_size=16,
                             max_query_len=9, max_context_len=9)
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids, meta, None), plain(ids, meta, None), atol=1e-4, rtol=1e-4)
