"""LlamaForCausalLM.forward_cpu, the lean loop that runs a CPU step (decodes, and chunks short
enough for engine._cpu's attention): the same tokens, logprobs and cache bits as the layers' own
forward, and the steps and layouts it does not take go there."""

from dataclasses import replace

import pytest
import torch

from engine import Engine, SamplingParams
from kernels import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops.extension() is None, reason="engine._cpu is not built")


def _run(eng, prompts):
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=3, n=2)]
    ids = [eng.add_request(p, params[i % 2]) for i, p in enumerate(prompts)]
    outs = eng.run_until_done(ids)
    return [(s.token_ids, s.logprobs, s.top_logprobs) for o in outs for s in o.samples]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cpu_loop_gives_the_bits_of_the_layers_forward(model_dirs, arch, monkeypatch):
    # no prefix caching: the second run must schedule the steps of the first
    eng = Engine(str(model_dirs[arch]), device="cpu", dtype=torch.float32, enable_prefix_caching=False)
    model = eng.core.model
    # qwen3's q/k norms are not in the loop: its steps run the layers' forward
    assert (model.cpu_layers is None) == (arch == "qwen3")
    used = []
    real = type(model).forward_cpu

    def counted(self, *args):
        out = real(self, *args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(type(model), "forward_cpu", counted)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), list(range(40, 57))]
    fast = _run(eng, prompts)
    assert used and all(used) if arch != "qwen3" else not used
    layers, model.cpu_layers, used[:] = model.cpu_layers, None, []
    slow = _run(eng, prompts)
    assert not used
    assert fast == slow  # tokens and logprobs to the bit
    model.cpu_layers = layers


def test_cpu_loop_writes_the_cache_of_the_layers_forward(model_dirs):
    eng = Engine(str(model_dirs["llama"]), device="cpu", dtype=torch.float32)
    model, runner = eng.core.model, eng.core.runner
    seen = []
    real = model.forward

    def capture(ids, meta, kv):
        seen.append((ids.clone(), meta, kv))
        return real(ids, meta, kv)

    model.forward = capture
    eng.run_until_done([eng.add_request(list(range(5, 5 + n)), SamplingParams(temperature=0, max_tokens=6))
                        for n in (3, 20, 33)])
    del model.forward
    decodes = next(c for c in seen if c[1].max_query_len == 1 and len(c[0]) == 3)
    prompts = next(c for c in seen if c[1].max_query_len > 1)  # prompts' chunks, side by side
    assert prompts[1].block_tables.shape[0] >= 2
    with torch.inference_mode():
        for ids, meta, _ in (decodes, prompts):
            caches = []
            for layers in (model.cpu_layers, None):
                kv = runner.kv_cache.clone()
                kept, model.cpu_layers = model.cpu_layers, layers
                caches.append((model(ids, meta, kv), kv))
                model.cpu_layers = kept
            assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
        ids, meta, _ = decodes
        # layouts the loop does not index are left to the layers' forward, before anything runs
        x, kv = model.embed(ids), runner.kv_cache.clone()
        for odd in (replace(meta, block_tables=meta.block_tables.long()),
                    replace(meta, block_tables=meta.block_tables[:1]),  # fewer rows than tokens
                    replace(meta, block_tables=meta.block_tables[0]),
                    replace(meta, context_lens=meta.context_lens[:2]),
                    replace(meta, positions=meta.positions.int()),
                    replace(meta, query_start_loc=meta.query_start_loc.long())):
            assert model.forward_cpu(x, odd, kv) is None
        assert torch.equal(kv, runner.kv_cache)


def test_steps_whose_chunks_follow_long_prefixes_run_the_torch_path(model_dirs, monkeypatch):
    # past kernels.attention.CPU_ROWS_MAX_PREFIX_KEYS a step's chunks go to paged_attention_cpu's
    # matmuls under the layers' forward; its tokens stay those of the other path (greedy, to rounding)
    from kernels import attention

    eng = Engine(str(model_dirs["llama"]), device="cpu", dtype=torch.float32, enable_prefix_caching=False)
    model = eng.core.model
    seen, real = [], type(model).forward_cpu

    def counted(self, x, meta, kv):
        seen.append(meta.max_query_len)
        return real(self, x, meta, kv)

    monkeypatch.setattr(type(model), "forward_cpu", counted)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(5, 45)), list(range(50, 70))]

    def tokens():
        outs = eng.run_until_done([eng.add_request(p, params) for p in prompts])
        return [o.samples[0].token_ids for o in outs]

    rows = tokens()
    assert max(seen) > 1  # the prompts' step ran in the lean loop, chunks and all
    seen.clear()
    monkeypatch.setattr(attention, "CPU_ROWS_MAX_PREFIX_KEYS", -1)  # even fresh prompts
    assert tokens() == rows
    assert seen and max(seen) == 1  # only decode steps took the loop
