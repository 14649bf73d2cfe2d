"""Hot-path ops. Each module holds an op's torch reference (the oracle) and its dispatch.

CPU tensors run the reference; the Triton and CUDA kernels that replace them on GPU tensors
live beside each reference (issue: kernels), called through the same signatures.
"""

from kernels.activation import silu_and_mul
from kernels.attention import paged_attention
from kernels.block_copy import copy_blocks
from kernels.kv_store import rotary_store_kv, store_kv
from kernels.lora import lora
from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary
from kernels.sampling import sample

__all__ = [
    "apply_rotary",
    "copy_blocks",
    "lora",
    "paged_attention",
    "rms_norm",
    "rotary_store_kv",
    "sample",
    "silu_and_mul",
    "store_kv",
]
