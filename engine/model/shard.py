"""Which part of the model one tensor-parallel rank holds (Megatron-style, as vLLM shards).

- Attention: each rank holds num_heads / N query heads and their KV heads: num_kv_heads / N of
  them, or, when there are fewer KV heads than ranks, the one KV head its query heads read
  (replicated on N / num_kv_heads ranks). qkv_proj (and its bias) is split by output rows,
  o_proj by input columns; o_proj's output is a partial sum, all-reduced.
- MLP: gate_up_proj split by output rows (intermediate_size / N each of gate and up), down_proj
  by input columns, all-reduced.
- Embedding and LM head: split by vocabulary rows (ceil(V / N) each, the last padded with
  zeros); a rank looks up only its own ids (an all-reduce fills the rest), and the logits of all
  ranks are gathered.
- Norms (Qwen3's q/k norm included) are per head or per hidden unit: every rank holds them whole.
  Biases of the all-reduced projections live on rank 0 only (they are added once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import CheckpointError


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1
    group: object = None  # a torch.distributed process group (None: the default one)

    def check(self, cfg) -> None:
        """Raise CheckpointError unless the model splits evenly over `size` ranks."""
        n = self.size
        problems = []
        if cfg.num_heads % n:
            problems.append(f"num_attention_heads {cfg.num_heads}")
        if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
            problems.append(f"num_key_value_heads {cfg.num_kv_heads} (nor does it divide {n})")
        if cfg.intermediate_size % n:
            problems.append(f"intermediate_size {cfg.intermediate_size}")
        if problems:
            raise CheckpointError(f"tensor_parallel_size {n} does not divide " + ", ".join(problems))

    # ---- what this rank holds ----------------------------------------------------------------
    def q_heads(self, cfg) -> tuple[int, int]:
        """(first query head, count)."""
        per = cfg.num_heads // self.size
        return self.rank * per, per

    def kv_heads(self, cfg) -> tuple[int, int]:
        """(first KV head, count): its own share, or the one its query heads read."""
        if cfg.num_kv_heads >= self.size:
            per = cfg.num_kv_heads // self.size
            return self.rank * per, per
        return self.q_heads(cfg)[0] // (cfg.num_heads // cfg.num_kv_heads), 1

    def ffn(self, cfg) -> tuple[int, int]:
        per = cfg.intermediate_size // self.size
        return self.rank * per, per

    def vocab(self, cfg) -> tuple[int, int]:
        """(first token id, rows held); the last rank's rows may run past the vocabulary."""
        per = -(-cfg.vocab_size // self.size)
        return self.rank * per, per

    def qkv_rows(self, cfg) -> torch.Tensor:
        """Rows of the full fused qkv weight ([q | k | v] by rows) this rank holds, in order."""
        d = cfg.head_dim
        q0, nq = self.q_heads(cfg)
        k0, nk = self.kv_heads(cfg)
        q_total, kv_total = cfg.num_heads * d, cfg.num_kv_heads * d
        return torch.cat([torch.arange(q0 * d, (q0 + nq) * d),
                          q_total + torch.arange(k0 * d, (k0 + nk) * d),
                          q_total + kv_total + torch.arange(k0 * d, (k0 + nk) * d)])

    def gate_up_rows(self, cfg) -> torch.Tensor:
        i0, ni = self.ffn(cfg)
        return torch.cat([torch.arange(i0, i0 + ni), cfg.intermediate_size + torch.arange(i0, i0 + ni)])

    # ---- communication -----------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[T, V / N] of every rank -> [T, V] on every rank."""
        if self.size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab_size]
