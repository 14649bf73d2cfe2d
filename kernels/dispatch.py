"""Where an op runs: CUDA tensors run the Triton/CUDA kernels, CPU tensors the torch reference.
SELFEVAL_KERNELS=triton sends CPU tensors to the Triton kernels too (with TRITON_INTERPRET=1 set
before triton is imported), so the whole engine can run its kernels under the interpreter."""

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the CPU path needs no triton
    HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    return t.is_cuda or os.environ.get("SELFEVAL_KERNELS") == "triton"
