"""The oracle is transformers: same logits (float32) and the same greedy tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import Engine, SamplingParams
from engine.errors import CheckpointError
from engine.model.loader import load_model
from engine.step_input import prepare_step

ARCHS = ["llama", "qwen2", "qwen3"]


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [1, 16])
def test_prefill_logits_equal_transformers(model_dirs, arch, block_size):
    path = model_dirs[arch]
    eng = Engine(str(path), block_size=block_size, num_blocks=512)
    hf = _hf(path)
    ids = torch.randint(0, eng.model.config.vocab_size, (2, 37))
    for row in ids:
        seq = 10_000 + int(row[0])
        eng.block_manager.allocate(seq, 0)
        ours = eng.runner.execute(prepare_step(eng.block_manager, [seq], [row.tolist()]))
        eng.block_manager.free(seq)
        with torch.no_grad():
            ref = hf(row[None]).logits[0].float()
        assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_transformers_generate(model_dirs, arch):
    path = model_dirs[arch]
    eng = Engine(str(path), block_size=4, num_blocks=256)
    hf = _hf(path)
    prompts = [torch.randint(0, eng.model.config.vocab_size, (n,)).tolist() for n in (5, 23, 11)]
    outs = eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert out.samples[0].token_ids == ref[0, len(prompt):].tolist()
    assert eng.num_free_blocks == 256


def test_sharded_checkpoint_loads(model_dirs):
    path = model_dirs["qwen2"]
    assert len(list(path.glob("*.safetensors"))) > 1
    model, _ = load_model(path)
    assert model.config.qkv_bias


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path)


def test_dummy_load_needs_only_the_config(tmp_path, llama_dir):
    # Benchmarks of a model shape ship config.json alone: "dummy" fills every parameter.
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    model, _ = load_model(tmp_path, load_format="dummy")
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(CheckpointError, match="load_format"):
        load_model(llama_dir, load_format="pt")


def test_malformed_config_is_named(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    for f in llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(llama_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.1.mlp.gate_up_proj"):
        load_model(tmp_path)
