"""Llama-family decoder (Llama 3.x, Qwen2/2.5 with qkv bias, Qwen3 with q/k norm) over the
paged KV cache. Projections are fused (qkv, gate_up); the loader splits checkpoint tensors in."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

import kernels
from engine.model.config import ModelConfig
from engine.model.lora import LoraSlot
from engine.model.shard import Shard
from kernels import cpu_ops
from kernels.attention import (
    CpuAttentionPlan,
    count_prefix_keys,
    cpu_rows_attention,
    packed_causal_attention,
    plan_cpu_attention,
)
from kernels.cascade import SharedPrefixes, cascade_decode_attention
from kernels.dispatch import use_triton
from kernels.linear import pack_weight, packed_linear, unpack_weight
from kernels.rotary import rotary_cache, rotary_rows


@dataclass
class AttentionMetadata:
    """Per-step batch layout, shared by every layer."""

    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T] cache slot of each new token
    block_tables: torch.Tensor  # int32 [B, W]
    context_lens: torch.Tensor  # int32 [B] cached length including this step's tokens
    query_start_loc: torch.Tensor  # int32 [B + 1]
    block_size: int
    max_query_len: int  # host-side maxima, so kernels size their grids without a device sync
    max_context_len: int
    adapter_mask: torch.Tensor | None = None  # bool [T]: tokens the LoRA adapter applies to
    # Made once a step by the model on the path without Triton (kernels.rotary / kernels.attention).
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    cpu_plan: CpuAttentionPlan | None = None
    # A decode step whose rows share prompt blocks (kernels.cascade), on the Triton path.
    shared_prefixes: SharedPrefixes | None = None
    # Cached keys the step's chunk rows read (kernels.attention.count_prefix_keys), host-side, CPU.
    prefix_keys: int | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.shard = shard
        self.num_heads, self.num_kv_heads = shard.q_heads(cfg)[1], shard.kv_heads(cfg)[1]
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.qkv_lora, self.o_lora = LoraSlot(), LoraSlot()

    def forward(self, x, meta: AttentionMetadata, k_cache, v_cache, cos_sin) -> torch.Tensor:
        """k_cache None: dense causal attention over the packed sequences (training)."""
        qkv = self.qkv_lora(x, self.qkv_proj(x), meta.adapter_mask)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        if k_cache is None:
            q, k = kernels.apply_rotary(q, k, meta.positions, cos_sin, meta.rope)
            o = packed_causal_attention(q, k, v, meta.query_start_loc, self.scale)
        else:
            q = kernels.rotary_store_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.positions,
                                        cos_sin, meta.rope)
            if meta.shared_prefixes is not None:
                o = cascade_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                             meta.block_size, self.scale, meta.shared_prefixes)
            else:
                o = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                            meta.query_start_loc, meta.block_size, self.scale,
                                            meta.max_query_len, meta.max_context_len, meta.cpu_plan,
                                            meta.prefix_keys)
        o = o.reshape(-1, self.q_size)
        return self.shard.all_reduce(self.o_lora(o, self.o_proj(o), meta.adapter_mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.shard = shard
        inter = shard.ffn(cfg)[1]
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_lora, self.down_lora = LoraSlot(), LoraSlot()

    def forward(self, x: torch.Tensor, adapter_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = kernels.silu_and_mul(self.gate_up_lora(x, self.gate_up_proj(x), adapter_mask))
        return self.shard.all_reduce(self.down_lora(h, self.down_proj(h), adapter_mask))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shard)

    def forward(self, x, residual, meta, k_cache, v_cache, cos_sin):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, meta, k_cache, v_cache, cos_sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, meta.adapter_mask), residual


class PackedLinear(nn.Module):
    """An nn.Linear in its inference-only CPU form (kernels.linear): the same features and bias,
    the weight held once, packed; `weight` unpacks it on access (adapters check its shape)."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack_weight(linear.weight.detach(), parts))
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return unpack_weight(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def pack_linears(model: LlamaForCausalLM, parts: int) -> None:
    """Swap every layer's projections for PackedLinear (inference on the CPU; never trained)."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            linear = getattr(owner, name)
            if isinstance(linear, nn.Linear):
                setattr(owner, name, PackedLinear(linear, parts if linear.out_features % parts == 0 else 1))
    layers = [(layer.input_layernorm, layer.self_attn.qkv_proj, layer.self_attn.o_proj,
               layer.post_attention_layernorm, layer.mlp.gate_up_proj, layer.mlp.down_proj)
              for layer in model.layers]
    plain = all(isinstance(m, PackedLinear) for mods in layers for m in mods[1:3] + mods[4:])
    model.cpu_layers = layers if plain and not model.config.qk_norm and model.shard.size == 1 else None


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard | None = None):
        """shard: the part one tensor-parallel rank holds (engine.model.shard); None: all of it.
        config stays the whole model's; num_kv_heads_local is what this rank's KV cache holds."""
        super().__init__()
        self.config = cfg
        self.shard = shard = shard or Shard()
        shard.check(cfg)
        self.num_kv_heads_local = shard.kv_heads(cfg)[1]
        vocab_rows = shard.vocab(cfg)[1] if shard.size > 1 else cfg.vocab_size
        self.embed_tokens = nn.Embedding(vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tied = cfg.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, vocab_rows, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)  # see init_rotary
        # Each layer's modules for forward_cpu, once pack_linears made the model's CPU inference
        # form (None: the layers' own forward for every step).
        self.cpu_layers: list[tuple] | None = None

    def init_rotary(self) -> None:
        """Build the float32 cos/sin table on the model's device (after weights are placed)."""
        cfg = self.config
        table = rotary_cache(cfg.inv_freq, cfg.max_position_embeddings, cfg.rope_scaling)
        self.cos_sin = table.to(self.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor | None) -> torch.Tensor:
        """input_ids [T]; kv_cache [2, L, slots, Hkv, D], or None for dense causal attention over
        the packed sequences of meta.query_start_loc (training). Returns hidden states [T, hidden]."""
        x, residual = self.embed(input_ids), None
        if not use_triton(x):  # what every layer shares is made once here, not once a layer
            # engine._cpu's RoPE + KV store needs no rotary rows; its attention takes every row of a
            # step unless its chunks follow long prefixes, with no plan (CPU_ROWS_MAX_PREFIX_KEYS).
            ext = kv_cache is not None and cpu_ops.available(x, kv_cache)
            if ext and meta.prefix_keys is None and meta.max_query_len > 1:
                starts = meta.query_start_loc
                meta = replace(meta, prefix_keys=count_prefix_keys(starts[1:] - starts[:-1],
                                                                   meta.context_lens))
            rows = ext and cpu_rows_attention(meta.max_query_len, meta.prefix_keys or 0)
            if rows and self.cpu_layers is not None and meta.adapter_mask is None:
                out = self.forward_cpu(x, meta, kv_cache)
                if out is not None:
                    return out
            meta = replace(meta, rope=None if ext else rotary_rows(meta.positions, self.cos_sin, x.dtype),
                           cpu_plan=None if kv_cache is None or rows else plan_cpu_attention(
                               meta.block_tables, meta.context_lens, meta.query_start_loc, meta.block_size))
        for i, layer in enumerate(self.layers):
            caches = (None, None) if kv_cache is None else (kv_cache[0, i], kv_cache[1, i])
            x, residual = layer(x, residual, meta, *caches, self.cos_sin)
        return self.norm(x, residual)[0]

    def forward_cpu(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor,
                    ) -> torch.Tensor | None:
        """The layers of a CPU step (float32, no adapter rows, no chunk after a long cached prefix:
        kernels.attention.cpu_rows_attention) as one lean loop into engine._cpu:
        the layers' forward makes the same calls in the same order (so the same bits: tested), but
        its modules and per-call checks cost time: the batch-1 forward of the 8-layer 512-wide
        model took 4.5 ms through them and 3.0 ms here (timed alone, same run);
        bench/throughput.py --device cpu's batch-1 decode step went from 4.96 to 3.46 ms with it.
        What every layer shares is checked once here; None: a layout this loop does not take (the
        layers' forward runs instead)."""
        ext, cfg = cpu_ops.extension(), self.config
        tokens, hidden = x.shape
        attn0 = self.layers[0].self_attn
        heads, kv_heads, dim, scale = attn0.num_heads, self.num_kv_heads_local, cfg.head_dim, attn0.scale
        q_size, kv_size = heads * dim, kv_heads * dim
        positions, slots = meta.positions, meta.slot_mapping
        tables, lens, starts = meta.block_tables, meta.context_lens, meta.query_start_loc
        cos_sin, block = self.cos_sin, meta.block_size
        seqs = tables.shape[0] if tables.dim() == 2 else -1
        if (not cpu_ops.available(x, kv_cache) or x.dim() != 2 or kv_cache.dim() != 5
                or kv_cache.shape[3:] != (kv_heads, dim) or not kv_cache.is_contiguous()
                or not (positions.is_cpu and slots.is_cpu and tables.is_cpu and lens.is_cpu and starts.is_cpu)
                or seqs < 0 or positions.dtype is not torch.int64 or slots.dtype is not torch.int64
                or positions.shape != (tokens,) or slots.shape != (tokens,) or not positions.is_contiguous()
                or not slots.is_contiguous() or tables.dtype is not torch.int32
                or lens.dtype is not torch.int32 or tables.stride(1) != 1 or lens.shape != (seqs,)
                or not lens.is_contiguous() or starts.dtype is not torch.int32 or starts.shape != (seqs + 1,)
                or not starts.is_contiguous() or cos_sin.dtype is not torch.float32
                or not cos_sin.is_contiguous() or cos_sin.shape[1] != dim
                or not x.is_contiguous() or dim % 2):
            return None
        # a step of decodes alone: row b is sequence b's one query (no offsets to read)
        offsets = 0 if meta.max_query_len == 1 and tokens == seqs else starts.data_ptr()
        threads = torch.get_num_threads()
        f32 = torch.float32
        slots_total = kv_cache.shape[2]
        c_s0, c_s1 = kv_cache.stride(2), kv_cache.stride(3)
        normed = torch.empty((tokens, hidden), dtype=f32)
        residuals = (torch.empty((tokens, hidden), dtype=f32), torch.empty((tokens, hidden), dtype=f32))
        q = torch.empty((tokens, heads, dim), dtype=f32)
        attn = torch.empty((tokens, q_size), dtype=f32)
        act = None
        residual, flip = x, 0
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj) in enumerate(self.cpu_layers):
            k_cache, v_cache = kv_cache[0, i], kv_cache[1, i]
            if i == 0:  # the first norm has no residual to add
                ext.rms_norm(x.data_ptr(), 0, norm1.weight.data_ptr(), normed.data_ptr(), 0, tokens, hidden,
                             hidden, 0, norm1.eps, False, threads)
            else:
                res_out, flip = residuals[flip], 1 - flip  # never the buffer it reads
                ext.rms_norm(x.data_ptr(), residual.data_ptr(), norm1.weight.data_ptr(), normed.data_ptr(),
                             res_out.data_ptr(), tokens, hidden, hidden, hidden, norm1.eps, True, threads)
                residual = res_out
            qkv = packed_linear(normed, qkv_proj.packed, qkv_proj.bias)  # [T, q + 2 kv], rows contiguous
            row, ptr = qkv.stride(0), qkv.data_ptr()
            ext.rotary_store_kv(
                ptr, ptr + 4 * q_size, ptr + 4 * (q_size + kv_size), q.data_ptr(),
                k_cache.data_ptr(), v_cache.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                cos_sin.data_ptr(), cos_sin.shape[0], slots_total, tokens, heads, kv_heads, dim,
                row, dim, row, dim, row, dim, c_s0, c_s1)
            ext.paged_attention(
                q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), attn.data_ptr(), tables.data_ptr(),
                lens.data_ptr(), offsets, seqs, tokens, heads, kv_heads, dim, block, slots_total // block,
                tables.shape[1], tables.stride(0), q_size, dim, c_s0, c_s1, scale, threads)
            h = packed_linear(attn, o_proj.packed, o_proj.bias)
            res_out, flip = residuals[flip], 1 - flip
            ext.rms_norm(h.data_ptr(), residual.data_ptr(), norm2.weight.data_ptr(), normed.data_ptr(),
                         res_out.data_ptr(), tokens, hidden, hidden, hidden, norm2.eps, True, threads)
            residual = res_out
            up = packed_linear(normed, gate_up_proj.packed, gate_up_proj.bias)
            if act is None:
                act = torch.empty((tokens, up.shape[1] // 2), dtype=f32)
            ext.silu_and_mul(up.data_ptr(), act.data_ptr(), tokens, act.shape[1], up.stride(0), threads)
            x = packed_linear(act, down_proj.packed, down_proj.bias)
        return self.norm(x, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        shard = self.shard
        if shard.size == 1:
            return self.embed_tokens(input_ids)
        start, rows = shard.vocab(self.config)
        mine = (input_ids >= start) & (input_ids < start + rows)  # the other ranks add the rest
        x = self.embed_tokens((input_ids - start).clamp(0, rows - 1))
        return shard.all_reduce(x * mine[:, None].to(x.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(hidden, weight).float()
        return self.shard.gather_vocab(logits, self.config.vocab_size)
