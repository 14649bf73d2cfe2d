"""Linear layers on the CPU, weights packed for the small-batch matmuls of decoding.

A decode step multiplies a few rows by every weight matrix, so it streams the weights from
memory. Stored as nn.Linear keeps them ([out, in]), torch's CPU matmul of a few rows reads them
at a third of the machine's read bandwidth and on one thread (measured, 2-core EPYC: 7.5 ms per
token for the 88 MB of an 8-layer 512-wide model). Packed as `parts` column blocks of the
transposed weight ([parts, in, out / parts], each block contiguous), one batched matmul gives
each thread its own block: 4.1 ms. F.linear stays the reference."""

import torch
import torch.nn.functional as F


def pack_weight(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """[out, in] -> [parts, in, out / parts]: block p holds output columns p*C .. (p+1)*C - 1."""
    out_features, in_features = weight.shape
    if parts < 1 or out_features % parts:
        raise ValueError(f"cannot split {out_features} outputs into {parts} equal parts")
    return weight.t().reshape(in_features, parts, out_features // parts).transpose(0, 1).contiguous()


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """pack_weight's inverse: [parts, in, C] -> [parts * C, in]."""
    parts, in_features, cols = packed.shape
    return packed.transpose(0, 1).reshape(in_features, parts * cols).t().contiguous()


# From this many rows on (a prompt), each block's product goes straight into its columns of the
# output (a strided GEMM result) rather than through [parts, M, C] and a copy: the copy of a
# 2048-row prefill's outputs cost 15% of its matmuls (2-core Xeon, 8-layer 512-wide model); below
# ~512 rows the batched matmul is faster.
VIEWS_MIN_ROWS = 512


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, unpack_weight(packed), bias) for x [M, in]."""
    parts, _, cols = packed.shape
    if parts > 1 and x.shape[0] >= VIEWS_MIN_ROWS:
        y = torch.empty((x.shape[0], parts * cols), dtype=x.dtype, device=x.device)
        for p in range(parts):
            y[:, p * cols:(p + 1) * cols].addmm_(x, packed[p], beta=0)
        return y if bias is None else y.add_(bias)
    y = torch.matmul(x, packed)  # [parts, M, C]
    y = y[0] if parts == 1 else y.transpose(0, 1).reshape(x.shape[0], parts * cols)
    return y if bias is None else y + bias


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
