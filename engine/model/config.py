"""The model's shape, read from a Hugging Face config (Llama 3.x, Qwen2/2.5, Qwen3, Mistral)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import CheckpointError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    inv_freq: torch.Tensor
    rope_scaling: float  # multiplies cos and sin (attention_factor of yarn/longrope)
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """Read a transformers PretrainedConfig (any 4.45+ or 5.x layout)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED:
            raise CheckpointError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
            )
        num_heads = hf.num_attention_heads
        num_kv = getattr(hf, "num_key_value_heads", None) or num_heads
        if not getattr(hf, "head_dim", None) and hf.hidden_size % num_heads:
            raise CheckpointError(f"hidden_size {hf.hidden_size} is not divisible by "
                                  f"num_attention_heads {num_heads}")
        if num_heads % num_kv:
            raise CheckpointError(f"num_attention_heads {num_heads} is not a multiple of "
                                  f"num_key_value_heads {num_kv}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        inv_freq, rope_scaling = _rope(hf, head_dim)
        eos = getattr(hf, "eos_token_id", None)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 follow attention_bias.
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=model_type == "llama" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            inv_freq=inv_freq,
            rope_scaling=rope_scaling,
            eos_token_ids=eos,
        )


def _rope(hf, head_dim: int) -> tuple[torch.Tensor, float]:
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta/rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    rope_type = rope_type or "default"
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(f"rope type {rope_type!r} is not supported")
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(factor)
