"""EngineConfig: every engine setting in one dataclass, validated once. The CLI, the benchmarks
and `Engine(**kwargs)` all build one; `EngineCore` reads nothing else."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from engine.errors import InvalidRequestError


@dataclass
class EngineConfig:
    """model: a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer).
    num_blocks: KV blocks of block_size tokens; None: what kv_cache_memory bytes hold
    (CPU: 1 GiB; CUDA: 85% of the free memory after the weights).
    max_batch_tokens: tokens one step computes at most (decodes + prefill chunks + suffixes).
    max_num_seqs: sequences (samples) running at once.
    max_model_len: longest sequence; None: the model's max_position_embeddings.
    cuda_graphs: replay captured CUDA graphs for pure decode steps (None: on for CUDA).
    adapter: a self-evaluation LoRA adapter directory, applied to the suffix tokens only.
    load_format: "dummy" fills random weights instead of reading them (benchmarks of a shape).
    enable_prefix_caching: requests whose prompts start with cached full blocks reuse them.
    tensor_parallel_size: the model split over this many processes (engine.tensor_parallel);
    tensor_parallel_timeout: seconds a collective waits for a stuck rank before failing.
    score_cache_tokens: the self-evaluation scores of the last sequences scored are kept, by their
    token ids, up to this many tokens in all (least recently used go first; 0 turns it off): a
    sample scored again at the same tokens (another run of the same seeded samples, a policy
    asking twice, POST /v1/score on a pair scored before) takes the score without its suffix,
    as prefix caching takes a prompt's blocks. Equal to the computed score up to rounding (as any
    change of batch). Benchmarks that time scoring turn it off.
    async_scheduling: launch the next decode step before the host has the current one's tokens
    (they feed it on the device), so host work overlaps device work (EngineCore._step_transaction);
    the tokens are the synchronous loop's. Off by default, as in vLLM; one process only."""

    model: str
    device: str = "cpu"
    dtype: torch.dtype | None = None
    block_size: int = 16
    num_blocks: int | None = None
    max_batch_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    seed: int | None = None
    cuda_graphs: bool | None = None
    adapter: str | None = None
    load_format: str = "auto"
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    tensor_parallel_timeout: float = 60.0
    async_scheduling: bool = False
    score_cache_tokens: int = 1 << 20

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            names = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
                     "half": torch.float16, "bfloat16": torch.bfloat16}
            if self.dtype not in names:
                raise InvalidRequestError(f"dtype must be one of {sorted(names)} or a torch.dtype, "
                                          f"got {self.dtype!r}")
            self.dtype = names[self.dtype]
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise InvalidRequestError(f"dtype must be a torch.dtype or its name, got {self.dtype!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise InvalidRequestError(f"enable_prefix_caching must be True or False, "
                                      f"got {self.enable_prefix_caching!r}")
        if not isinstance(self.async_scheduling, bool):
            raise InvalidRequestError(
                f"async_scheduling must be True or False, got {self.async_scheduling!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise InvalidRequestError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")
        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")

        for name in ("block_size", "max_batch_tokens", "max_num_seqs", "tensor_parallel_size"):
            positive_int(name)
        for name in ("num_blocks", "max_model_len", "kv_cache_memory"):
            positive_int(name, allow_none=True)
        v = self.score_cache_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidRequestError(f"score_cache_tokens must be an integer >= 0, got {v!r}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise InvalidRequestError(
                "async_scheduling runs in one process: not with tensor_parallel_size > 1")
        t = self.tensor_parallel_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise InvalidRequestError(f"tensor_parallel_timeout must be a positive number of seconds, "
                                      f"got {t!r}")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidRequestError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise InvalidRequestError(f"device {self.device!r} is not a torch device: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError(f"device {self.device!r} asked for, but no CUDA device is available")
        if self.cuda_graphs and device.type != "cuda":
            raise InvalidRequestError("cuda_graphs=True needs a CUDA device")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32

    @property
    def use_cuda_graphs(self) -> bool:
        return self.torch_device.type == "cuda" if self.cuda_graphs is None else self.cuda_graphs

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
