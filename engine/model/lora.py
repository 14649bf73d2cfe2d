"""The self-evaluation adapter: LoRA on the attention and MLP projections, active only on tokens
whose adapter mask is set (the evaluation suffix). Prompt and response tokens never see it, so their
logits and KV cache are the base model's, bit for bit. Saved as adapter.safetensors plus
adapter_config.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import kernels
from engine.errors import CheckpointError

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


class LoraSlot(nn.Module):
    """The low-rank update of one projection; empty (a no-op) until an adapter is loaded."""

    def __init__(self):
        super().__init__()
        self.lora_a: nn.Parameter | None = None  # [r, in]
        self.lora_b: nn.Parameter | None = None  # [out, r]
        self.scale = 0.0

    def set(self, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        self.lora_a = None if a is None else nn.Parameter(a)
        self.lora_b = None if b is None else nn.Parameter(b)
        self.scale = scale

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.lora_a is None or mask is None:
            return y
        return kernels.lora(x, y, self.lora_a, self.lora_b, self.scale, mask)


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def slots(model: nn.Module) -> dict[str, tuple[nn.Linear, LoraSlot]]:
    """'layers.{i}.{target}' -> (the projection, its LoRA slot)."""
    out = {}
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        pairs = {"qkv_proj": (attn.qkv_proj, attn.qkv_lora), "o_proj": (attn.o_proj, attn.o_lora),
                 "gate_up_proj": (mlp.gate_up_proj, mlp.gate_up_lora),
                 "down_proj": (mlp.down_proj, mlp.down_lora)}
        out.update({f"layers.{i}.{name}": pair for name, pair in pairs.items()})
    return out


def init_adapter(model: nn.Module, cfg: LoraConfig, seed: int = 0, b_std: float = 0.0) -> None:
    """Fresh trainable adapter: A ~ N(0, 1/in), B = 0 (b_std > 0 gives a random B, for tests)."""
    g = torch.Generator().manual_seed(seed)
    for name, (linear, slot) in slots(model).items():
        if name.rsplit(".", 1)[1] not in cfg.targets:
            slot.set(None, None, 0.0)
            continue
        out_dim, in_dim = linear.weight.shape
        a = torch.randn(cfg.rank, in_dim, generator=g) / math.sqrt(in_dim)
        b = torch.randn(out_dim, cfg.rank, generator=g) * b_std
        w = linear.weight
        slot.set(a.to(w.device, torch.float32), b.to(w.device, torch.float32), cfg.scale)
    model.adapter_config = cfg


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, slot in slots(model).values() for p in (slot.lora_a, slot.lora_b) if p is not None]


def save_adapter(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (_, slot) in slots(model).items():
        if slot.lora_a is not None:
            tensors[f"{name}.lora_a"] = slot.lora_a.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_b"] = slot.lora_b.detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    cfg = asdict(model.adapter_config)
    cfg["targets"] = list(cfg["targets"])
    (out_dir / CONFIG_FILE).write_text(json.dumps({**cfg, **(extra or {})}, indent=2) + "\n")
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> LoraConfig:
    """Load an adapter into the model's slots; every tensor's shape is checked against the model."""
    adapter_dir = Path(adapter_dir)
    try:
        raw = json.loads((adapter_dir / CONFIG_FILE).read_text())
        cfg = LoraConfig(rank=int(raw["rank"]), alpha=float(raw["alpha"]), targets=tuple(raw["targets"]))
        tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    except FileNotFoundError as e:
        raise CheckpointError(f"adapter {adapter_dir}: missing {Path(e.filename).name}") from e
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"adapter {adapter_dir}: malformed {CONFIG_FILE} or weights ({e})") from e
    found = {k.rsplit(".", 1)[0] for k in tensors}
    unknown = found - set(slots(model))
    if unknown:
        raise CheckpointError(f"adapter {adapter_dir}: tensors for unknown projections {sorted(unknown)[:3]}")
    plan = []  # every tensor is checked before any slot changes: a bad adapter loads nothing
    for name, (linear, slot) in slots(model).items():
        if name not in found:
            plan.append((slot, None, None))
            continue
        a, b = tensors.get(f"{name}.lora_a"), tensors.get(f"{name}.lora_b")
        shard = getattr(model, "shard", None)
        if a is not None and b is not None and shard is not None and shard.size > 1:
            a, b = _rank_part(model, name.rsplit(".", 1)[1], a, b)
        out_dim, in_dim = linear.weight.shape
        if a is None or b is None or a.shape != (cfg.rank, in_dim) or b.shape != (out_dim, cfg.rank):
            shapes = [None if t is None else tuple(t.shape) for t in (a, b)]
            raise CheckpointError(f"adapter {adapter_dir}: {name} has A {shapes[0]} and B {shapes[1]}, "
                                  f"the model needs ({cfg.rank}, {in_dim}) and ({out_dim}, {cfg.rank})")
        dt = dtype or linear.weight.dtype
        plan.append((slot, a.to(linear.weight.device, dt), b.to(linear.weight.device, dt)))
    for slot, a, b in plan:
        slot.set(a, b, cfg.scale if a is not None else 0.0)
    model.adapter_config = cfg
    return cfg


def _rank_part(model: nn.Module, target: str, a: torch.Tensor, b: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor-parallel rank's part of one projection's adapter, split as the projection is:
    B's rows for the column-parallel ones (qkv, gate_up), A's columns for the row-parallel ones
    (o_proj, down_proj: their partial sums are all-reduced with the projection's)."""
    cfg, shard = model.config, model.shard
    if target == "qkv_proj" and b.shape[0] == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim:
        return a, b[shard.qkv_rows(cfg)]
    if target == "gate_up_proj" and b.shape[0] == 2 * cfg.intermediate_size:
        return a, b[shard.gate_up_rows(cfg)]
    if target == "o_proj" and a.shape[1] == cfg.num_heads * cfg.head_dim:
        first, count = shard.q_heads(cfg)
        return a[:, first * cfg.head_dim:(first + count) * cfg.head_dim], b
    if target == "down_proj" and a.shape[1] == cfg.intermediate_size:
        first, count = shard.ffn(cfg)
        return a[:, first:first + count], b
    return a, b  # a wrong shape: the check that follows names it


def has_adapter(model: nn.Module) -> bool:
    return any(slot.lora_a is not None for _, slot in slots(model).values())
