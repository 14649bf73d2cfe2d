"""Load a local Hugging Face checkpoint directory (config.json + *.safetensors, sharded or not)
and its tokenizer. Never reaches a hub: a missing file is a CheckpointError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import CheckpointError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaForCausalLM
from engine.model.shard import Shard

# checkpoint projection -> (our fused parameter, index of the part it fills)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _check_dir(path: Path, weights: bool = True) -> None:
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model directory {str(path)!r} has no config.json")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    if weights and not list(path.glob("*.safetensors")):
        raise CheckpointError(f"model directory {str(path)!r} has no *.safetensors weights")


def load_hf_config(path: str | Path, weights: bool = True):
    """The directory's transformers config; weights=False accepts a directory without weights."""
    from transformers import AutoConfig

    path = Path(path)
    _check_dir(path, weights)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers' own validation raises several types: say which file
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from e


def _part_sizes(cfg: ModelConfig, fused: str, shard: Shard) -> list[int]:
    """Rows of each part of a fused projection on this rank."""
    if fused == "qkv_proj":
        kv = shard.kv_heads(cfg)[1] * cfg.head_dim
        return [shard.q_heads(cfg)[1] * cfg.head_dim, kv, kv]
    inter = shard.ffn(cfg)[1]
    return [inter, inter]


def _rank_slice(tensor, name: str, part: int | None, cfg: ModelConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a checkpoint tensor (engine.model.shard), read from a safetensors slice
    so that a rank never loads a whole tensor it holds a part of."""
    if shard.size == 1:
        return tensor[:]
    d = cfg.head_dim
    if part is not None:  # a fused projection's rows (weight or bias)
        if ".qkv_proj." in name:
            first, count = shard.q_heads(cfg) if part == 0 else shard.kv_heads(cfg)
            return tensor[first * d:(first + count) * d]
        first, count = shard.ffn(cfg)
        return tensor[first:first + count]
    if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: input columns
        first, count = shard.q_heads(cfg) if "o_proj" in name else shard.ffn(cfg)
        if "o_proj" in name:
            first, count = first * d, count * d
        return tensor[:, first:first + count]
    if name.endswith(("o_proj.bias", "down_proj.bias")):  # added once, after the all-reduce
        whole = tensor[:]
        return whole if shard.rank == 0 else torch.zeros_like(whole)
    if name in ("embed_tokens.weight", "lm_head.weight"):  # vocabulary rows, the last padded
        first, rows = shard.vocab(cfg)
        part_rows = tensor[first:min(first + rows, cfg.vocab_size)]
        pad = rows - part_rows.shape[0]
        return torch.cat([part_rows, part_rows.new_zeros(pad, part_rows.shape[1])]) if pad else part_rows
    return tensor[:]


def _target(name: str) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (our parameter name, fused part index or None)."""
    name = name.removeprefix("model.")
    for proj, (fused, part) in _FUSED.items():
        if f".{proj}." in name:
            return name.replace(f".{proj}.", f".{fused}."), part
    return name, None


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    load_format: str = "auto", shard: Shard | None = None,
) -> tuple[LlamaForCausalLM, object]:
    """Returns (model in eval mode on device, transformers config). load_format "dummy" (as in
    vLLM) skips the weight files and fills random weights on the device: benchmarks of a model
    shape need only its config.json and a tokenizer. shard: load only one tensor-parallel rank's
    part (engine.model.shard)."""
    shard = shard or Shard()
    path = Path(path)
    if load_format not in ("auto", "dummy"):
        raise CheckpointError(f"load_format must be 'auto' or 'dummy', not {load_format!r}")
    hf_config = load_hf_config(path, weights=load_format == "auto")
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, shard)
    model = model.to_empty(device=device).to(dtype)
    model.init_rotary()
    if load_format == "dummy":
        g = torch.Generator(device=device).manual_seed(0)
        for name, p in model.named_parameters():
            p.data.normal_(0.0, 0.02, generator=g) if p.dim() > 1 else p.data.fill_(1.0)
            if shard.rank > 0 and name.endswith(("o_proj.bias", "down_proj.bias")):
                p.data.zero_()  # added once, after the all-reduce (as _rank_slice loads them)
        return model.eval(), hf_config
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}  # parameter -> parts loaded
    for file in sorted(path.glob("*.safetensors")):
        try:
            _load_file(file, params, cfg, model, filled, shard)
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or corrupt file: say which one
            raise CheckpointError(f"{file}: cannot read the weights ({type(e).__name__}: {e}); "
                                  f"the file is truncated or not safetensors") from e
    missing = [
        n for n, p in params.items()
        if filled.get(n, 0) < (len(_part_sizes(cfg, n.rsplit(".", 2)[-2], shard)) if _is_fused(n) else 1)
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: {len(missing)} weights missing from the checkpoint: {shown}")
    return model.eval(), hf_config


def _load_file(file: Path, params: dict, cfg: ModelConfig, model: LlamaForCausalLM,
               filled: dict, shard: Shard) -> None:
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            name, part = _target(key)
            if name not in params:
                if "rotary_emb" in key or (key == "lm_head.weight" and model.lm_head is None):
                    continue
                raise CheckpointError(f"{file.name}: unexpected tensor {key!r}")
            tensor = _rank_slice(f.get_slice(key), name, part, cfg, shard)
            param = params[name]
            if part is None:
                dest = param.data
            else:
                sizes = _part_sizes(cfg, name.rsplit(".", 2)[-2], shard)
                dest = param.data.narrow(0, sum(sizes[:part]), sizes[part])
            if dest.shape != tensor.shape:
                raise CheckpointError(
                    f"{file.name}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            filled[name] = filled.get(name, 0) + 1


def _is_fused(name: str) -> bool:
    return ".qkv_proj." in name or ".gate_up_proj." in name


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise CheckpointError(
            f"model directory {str(path)!r} has no tokenizer (tokenizer.json or tokenizer_config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from e


def save_model(model: torch.nn.Module, hf_config, tokenizer, out_dir: str | Path) -> Path:
    """Write our model as a Hugging Face checkpoint (fused projections split back into q/k/v and
    gate/up), with its config and tokenizer: loadable here and by transformers alike."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if model.shard.size > 1:
        raise CheckpointError("save_model writes a whole model; this one is one tensor-parallel rank's part")
    unfused = {fused: [p for p, (f, _) in sorted(_FUSED.items(), key=lambda kv: kv[1][1]) if f == fused]
               for fused in ("qkv_proj", "gate_up_proj")}
    tensors = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        hf = name if name.startswith("lm_head") else f"model.{name}"
        fused = name.rsplit(".", 2)[-2]
        if fused in unfused and name.endswith(("weight", "bias")):
            for part, t in zip(unfused[fused], param.detach().split(_part_sizes(cfg, fused, Shard()), dim=0)):
                tensors[hf.replace(f".{fused}.", f".{part}.")] = t.contiguous().cpu()
        else:
            tensors[hf] = param.detach().contiguous().cpu()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
