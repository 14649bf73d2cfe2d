"""Where an op runs: CUDA tensors run the Triton/CUDA kernels, CPU tensors the torch reference.
SELFEVAL_KERNELS=triton sends CPU tensors to the Triton kernels too (with TRITON_INTERPRET=1 set
before triton is imported), so the whole engine can run its kernels under the interpreter;
SELFEVAL_KERNELS=reference keeps CUDA tensors on the torch references."""

import contextlib
import os
import threading

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the CPU path needs no triton
    HAS_TRITON = False


_reference_only = threading.local()


@contextlib.contextmanager
def reference_only():
    """Run the torch references on every device (differentiable: the trainer uses this)."""
    previous = getattr(_reference_only, "on", False)
    _reference_only.on = True
    try:
        yield
    finally:
        _reference_only.on = previous


def references_forced() -> bool:
    """reference_only() is active or SELFEVAL_KERNELS=reference: no kernel of ours, any device."""
    return getattr(_reference_only, "on", False) or os.environ.get("SELFEVAL_KERNELS") == "reference"


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON or getattr(_reference_only, "on", False):
        return False
    mode = os.environ.get("SELFEVAL_KERNELS")
    if mode == "reference":
        return False
    return t.is_cuda or mode == "triton"
