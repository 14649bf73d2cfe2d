"""Paging is invisible: any program of append / fork / truncate / score over the paged cache gives
the logits of a from-scratch forward of the same tokens (transformers, no cache)."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import Engine
from engine.step_input import prepare_step


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


def _from_scratch(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_programs_match_recomputation(llama_dir, hf_llama, block_size, seed):
    rng = random.Random(seed * 100 + block_size)
    eng = Engine(str(llama_dir), block_size=block_size, num_blocks=4096 // block_size)
    bm, vocab = eng.block_manager, eng.model.config.vocab_size
    free0 = bm.num_free_blocks
    suffix = list(eng.spec.suffix_ids)
    seqs: dict[int, list[int]] = {}
    next_id = 0

    def check_run(chunks: dict[int, list[int]]):
        ids = list(chunks)
        starts = {s: len(seqs[s]) for s in ids}
        logits = eng.runner.execute(prepare_step(bm, ids, [chunks[s] for s in ids]))
        row = 0
        for s in ids:
            full = seqs[s] + chunks[s]
            ref = _from_scratch(hf_llama, full)[starts[s]:]
            got = logits[row:row + len(chunks[s])]
            row += len(chunks[s])
            assert (got - ref).abs().max().item() < 1e-4, f"seq {s} diverged from recomputation"

    for _ in range(30):
        op = rng.choice(["new", "append", "append", "fork", "truncate", "score"] if seqs else ["new"])
        if op == "new":
            bm.allocate(next_id, 0)
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
            seqs[next_id] = []
            check_run({next_id: prompt})
            seqs[next_id] = prompt
            next_id += 1
        if op in ("new", "append"):
            # A batch of several sequences at once, with chunks of mixed lengths.
            pick = rng.sample(sorted(seqs), k=rng.randint(1, len(seqs)))
            chunks = {s: [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 3, 7]))] for s in pick}
            check_run(chunks)
            for s, c in chunks.items():
                seqs[s] += c
        elif op == "fork":
            parent = rng.choice(sorted(seqs))
            bm.fork(parent, next_id)
            seqs[next_id] = list(seqs[parent])
            next_id += 1
        elif op == "truncate":
            s = rng.choice(sorted(seqs))
            keep = rng.randint(1, max(1, len(seqs[s])))
            bm.truncate(s, keep)
            seqs[s] = seqs[s][:keep]
        elif op == "score":
            pick = rng.sample(sorted(seqs), k=rng.randint(1, len(seqs)))
            lengths = {s: len(seqs[s]) for s in pick}
            check_run({s: suffix for s in pick})
            for s in pick:
                bm.truncate(s, lengths[s])
        for s, toks in seqs.items():
            assert bm.length(s) == len(toks)
    for s in list(seqs):
        bm.free(s)
    assert bm.num_free_blocks == free0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_cache_programs_match_recomputation(llama_dir, hf_llama, seed):
    """New sequences start from cached blocks of shared prefixes (with fork, rollback, scoring
    and eviction from a small pool in between): the tokens they compute give the logits of a
    from-scratch forward, so a cached block always holds exactly the KV it claims."""
    rng = random.Random(seed)
    block_size = 4
    eng = Engine(str(llama_dir), block_size=block_size, num_blocks=20)
    bm, vocab = eng.block_manager, eng.model.config.vocab_size
    suffix = list(eng.spec.suffix_ids)
    stems = [[rng.randrange(vocab) for _ in range(rng.randint(4, 17))] for _ in range(3)]
    seqs: dict[int, list[int]] = {}
    hits = evicted = 0

    def run_and_check(chunks):
        ids = list(chunks)
        starts = {s: len(seqs[s]) for s in ids}
        logits = eng.runner.execute(prepare_step(bm, ids, [chunks[s] for s in ids]))
        row = 0
        for s in ids:
            ref = _from_scratch(hf_llama, seqs[s] + chunks[s])[starts[s]:]
            assert (logits[row:row + len(chunks[s])] - ref).abs().max().item() < 1e-4
            row += len(chunks[s])
            seqs[s] = seqs[s] + chunks[s]

    def register(s):
        done = bm.num_hashed_tokens(s)
        bm.cache_blocks(s, seqs[s][done:len(seqs[s]) // block_size * block_size])

    for next_id in range(60):
        op = rng.choice(["new", "new", "append", "fork", "truncate", "score", "free"] if seqs else ["new"])
        if op == "new":
            tokens = rng.choice(stems) + [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            lru = set(bm.evictable_blocks().tolist())
            cached = bm.allocate_prefix(next_id, tokens, 0)
            hit_blocks = set(bm.block_ids(next_id).tolist())
            hits += cached > 0
            seqs[next_id] = tokens[:cached]
            while bm.blocks_needed(next_id, len(tokens) - cached) > bm.num_free_blocks and len(seqs) > 1:
                victim = next(s for s in sorted(seqs) if s != next_id)  # free the oldest
                bm.free(victim)
                del seqs[victim]
            run_and_check({next_id: tokens[cached:]})
            evicted += len(lru - set(bm.evictable_blocks().tolist()) - hit_blocks)
            register(next_id)
        elif op == "append":
            s = rng.choice(sorted(seqs))
            if bm.blocks_needed(s, 3) <= bm.num_free_blocks:
                run_and_check({s: [rng.randrange(vocab) for _ in range(3)]})
                register(s)
        elif op == "fork" and bm.num_free_blocks > 2:
            parent = rng.choice(sorted(seqs))
            bm.fork(parent, next_id)
            seqs[next_id] = list(seqs[parent])
        elif op == "truncate":
            s = rng.choice(sorted(seqs))
            keep = rng.randint(1, max(1, len(seqs[s])))
            bm.truncate(s, keep)
            seqs[s] = seqs[s][:keep]
        elif op == "score":
            s = rng.choice(sorted(seqs))
            length = len(seqs[s])
            if bm.blocks_needed(s, len(suffix)) <= bm.num_free_blocks:
                run_and_check({s: suffix})
                bm.truncate(s, length)  # rolled back before anything is registered
                seqs[s] = seqs[s][:length]
        elif op == "free" and len(seqs) > 1:
            s = rng.choice(sorted(seqs))
            bm.free(s)
            del seqs[s]
    assert hits >= 5 and evicted > 0, (hits, evicted)
    for s in list(seqs):
        bm.free(s)
    assert bm.num_free_blocks == 20
