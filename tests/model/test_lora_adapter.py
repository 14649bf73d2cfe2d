"""The self-evaluation adapter: base tokens give bit-identical logits with the adapter loaded;
suffix logits equal transformers with LoRA hooked onto the suffix positions only; save/load
round-trips and bad adapters raise CheckpointError."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import Engine
from engine.errors import CheckpointError
from engine.model.lora import LoraConfig, init_adapter, load_adapter, save_adapter, slots
from engine.step_input import prepare_step


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory):
    eng = Engine(str(llama_dir), num_blocks=64)
    init_adapter(eng.model, LoraConfig(rank=4, alpha=8), seed=3, b_std=0.2)  # B != 0: it acts
    return save_adapter(eng.model, tmp_path_factory.mktemp("adapter"))


def _run(eng, ids, suffix_len):
    eng.block_manager.allocate(0, 0)
    logits = eng.runner.execute(prepare_step(eng.block_manager, [0], [ids], None, [suffix_len]))
    eng.block_manager.free(0)
    return logits


def test_base_tokens_bit_identical_and_suffix_changed(llama_dir, adapter_dir):
    base = Engine(str(llama_dir), num_blocks=64)
    tuned = Engine(str(llama_dir), num_blocks=64, adapter=str(adapter_dir))
    ids = torch.randint(5, base.model.config.vocab_size, (23,)).tolist()
    suffix = list(base.spec.suffix_after(ids[-1]))
    a, b = _run(base, ids + suffix, len(suffix)), _run(tuned, ids + suffix, len(suffix))
    n = len(ids)
    assert torch.equal(a[:n], b[:n])  # prompt and response: the base model exactly
    assert not torch.allclose(a[n:], b[n:], atol=1e-3)
    # Without suffix tokens the adapter is never touched.
    assert torch.equal(_run(base, ids, 0), _run(tuned, ids, 0))


def test_suffix_logits_match_transformers_with_masked_lora(llama_dir, adapter_dir):
    eng = Engine(str(llama_dir), num_blocks=64, adapter=str(adapter_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()
    cfg = eng.model.config
    ids = torch.randint(5, cfg.vocab_size, (17,)).tolist()
    suffix = list(eng.spec.suffix_after(ids[-1]))
    tokens = ids + suffix
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[len(ids):] = True

    ours = slots(eng.model)
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    parts = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, q + kv),
             "v_proj": ("qkv_proj", q + kv, q + 2 * kv), "o_proj": ("o_proj", 0, None),
             "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, 2 * inter),
             "down_proj": ("down_proj", 0, None)}

    def hook(slot, lo, hi):
        def add(module, inputs, output):
            delta = (inputs[0] @ slot.lora_a.T) @ slot.lora_b[lo:hi].T * slot.scale
            return output + delta * mask[None, :, None]
        return add

    for i, layer in enumerate(hf.model.layers):
        for name, (target, lo, hi) in parts.items():
            module = getattr(layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                             else layer.mlp, name)
            module.register_forward_hook(hook(ours[f"layers.{i}.{target}"][1], lo, hi))
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(_run(eng, tokens, len(suffix)), ref, atol=1e-4, rtol=1e-4)


def test_scores_change_with_the_adapter_and_generation_does_not(llama_dir, adapter_dir):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, n=1, score=True)
    base = Engine(str(llama_dir), num_blocks=64).generate(["Q: 2+2"], params)[0].samples[0]
    tuned = Engine(str(llama_dir), num_blocks=64, adapter=str(adapter_dir)).generate(
        ["Q: 2+2"], params)[0].samples[0]
    assert base.token_ids == tuned.token_ids
    assert base.score != pytest.approx(tuned.score, abs=1e-6)


def test_bad_adapters_raise_checkpoint_errors(llama_dir, adapter_dir, tmp_path):
    eng = Engine(str(llama_dir), num_blocks=16)
    with pytest.raises(CheckpointError, match="missing adapter_config.json"):
        load_adapter(eng.model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"rank": 8, "alpha": 16, "targets": ["o_proj"]}))
    (tmp_path / "adapter.safetensors").write_bytes((adapter_dir / "adapter.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="has A"):  # rank 8 declared, rank 4 stored
        load_adapter(eng.model, tmp_path)
    assert not any(slot.lora_a is not None for _, slot in slots(eng.model).values())  # nothing loaded
    assert np.isfinite(eng.generate(["hi"])[0].samples[0].logprobs).all()  # the engine still works
