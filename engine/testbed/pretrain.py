"""Pretrains the testbed's base model with our own model code (Llama architecture, dense causal
attention, torch references so autograd runs on any device): next-token loss on the assistant's
solution of freshly generated problems of the task (cfg.task), AdamW with warm-up and cosine
decay.

With direct_frac > 0 that share of the solutions gives the answer with no working ("#### 374"), as
people and LLMs sometimes do. The model then learns both habits and picks one with its first
sampled token; answering directly is fine on easy problems and mostly wrong on long ones, so which
habit a sample took, and on which problem, is something a self-evaluation can see.

With attempt_frac > 0 (the path tasks) that share of the solutions is a wrong attempt (the task's
`attempt`: another arm, followed by the question's own edges to its end), as real text holds wrong
answers beside right ones: the model learns that a path follows the question's edges even on a
wrong arm, so its wrong samples end where the arm ends instead of making up an edge to the target.

With check_frac > 0 a share of each batch is the answer-checking task a real LLM brings from its
own training: a solution (right, or wrong as the task's `corrupt` makes it, for arith one step's
result off and the chain carried on from it; or as its `attempt` does, check_wrong="attempt"),
then the user asks CHECK_QUESTION (or, with check_questions > 1, one of that many CHECK_QUESTIONS,
so that checking answers any question about the answer, not one phrase) and the assistant says
"right" or "wrong". The solutions are synthetic, never the model's samples, and the question
and answer words are not the self-evaluation ones: the adapter still has to learn to use this
skill on its own samples.

With partial_frac > 0 (edges) that share of the checking task is asked of a path cut short
(edges.partial): "right" when it leads on to the target, "wrong" when it took another arm or its
last edge is not in the question. `levels` picks the problem shapes (default: the task's
PRETRAIN_LEVELS, what the bundled model was built on, so its recipe still rebuilds it)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from engine.model.config import ModelConfig
from engine.model.llama import AttentionMetadata, LlamaForCausalLM
from engine.model.loader import load_model, load_tokenizer, save_model
from engine.testbed import load_task
from engine.testbed.tokenizer import make_tokenizer
from kernels.dispatch import reference_only


@dataclass
class PretrainConfig:
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 256
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    check_frac: float = 0.0  # share of examples that are the answer-checking task
    direct_frac: float = 0.0  # share of solutions that give the answer with no working (arith)
    attempt_frac: float = 0.0  # share of solutions that are the task's wrong attempts (paths, edges)
    check_wrong: str = "corrupt"  # the checking task's wrong solutions: the task's corrupt or attempt
    check_questions: int = 1  # how many of CHECK_QUESTIONS the checking task asks (1: the first only)
    partial_frac: float = 0.0  # share of checking examples asked mid-way, on a cut-short path (edges)
    levels: tuple[int, ...] | None = None  # problem levels (default: the task's PRETRAIN_LEVELS, else all)
    task: str = "arith"  # engine.testbed.TASKS


# The checking task's questions: none is the self-evaluation question or uses its words.
CHECK_QUESTIONS = ("Check every line.", "Is this right?", "Is the answer correct?", "Check your answer.",
                   "Any mistake in it?", "Verify it.", "Is that correct?", "Does this work?")
CHECK_QUESTION = CHECK_QUESTIONS[0]


def hf_config(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")


def _chat_ids(tokenizer, messages, gen):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _with_reply(tokenizer, turns: list[dict], reply: str) -> tuple[list[int], list[bool]]:
    """Chat-formatted ids of turns plus the assistant's reply, and a mask of the reply's tokens
    (the ones the loss predicts)."""
    prompt = _chat_ids(tokenizer, turns, True)
    full = _chat_ids(tokenizer, turns + [{"role": "assistant", "content": reply}], False)
    full = full[: full.index(tokenizer.eos_token_id, len(prompt)) + 1]  # up to the turn's end
    return full, [False] * len(prompt) + [True] * (len(full) - len(prompt))


def encode(tokenizer, question: str, solution: str) -> tuple[list[int], list[bool]]:
    """Chat-formatted ids and a mask of the tokens the loss predicts (the assistant's turn)."""
    return _with_reply(tokenizer, [{"role": "user", "content": question}], solution)


def encode_check(tokenizer, question: str, solution: str, right: bool, check: str = CHECK_QUESTION,
                 ) -> tuple[list[int], list[bool]]:
    """The checking task: only the verdict is predicted."""
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": solution},
             {"role": "user", "content": check}]
    return _with_reply(tokenizer, turns, "right" if right else "wrong")


def _levels(spec, levels=None) -> list[int]:
    if levels is not None:
        return list(levels)
    return list(getattr(spec, "PRETRAIN_LEVELS", range(len(spec.LEVELS))))


def _example(tokenizer, rng, check_frac, direct_frac=0.0, task="arith", attempt_frac=0.0,
             check_wrong="corrupt", check_questions=1, partial_frac=0.0, levels=None):
    spec = load_task(task)
    levels = _levels(spec, levels)
    p = spec.make_problem(rng, levels[rng.randrange(len(levels))])
    if rng.random() >= check_frac:
        if attempt_frac and rng.random() < attempt_frac:
            return encode(tokenizer, p.question, spec.attempt(rng, p))
        return encode(tokenizer, p.question, p.direct if rng.random() < direct_frac else p.solution)
    right = rng.random() < 0.5
    wrong = getattr(spec, check_wrong)  # the task's corrupt or attempt
    if partial_frac and rng.random() < partial_frac:
        solution = spec.partial(rng, p, right)  # right: it leads on to the target
    else:
        solution = p.solution if right else wrong(rng, p)
    check = CHECK_QUESTIONS[rng.randrange(check_questions)] if check_questions > 1 else CHECK_QUESTION
    return encode_check(tokenizer, p.question, solution, right, check)


def _batch(tokenizer, rng, size, device, check_frac=0.0, direct_frac=0.0, task="arith", attempt_frac=0.0,
           check_wrong="corrupt", check_questions=1, partial_frac=0.0, levels=None):
    seqs = [_example(tokenizer, rng, check_frac, direct_frac, task, attempt_frac, check_wrong,
                     check_questions, partial_frac, levels) for _ in range(size)]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((size, width), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(size, width, dtype=torch.bool)
    for i, (s, m) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m)
    return ids.to(device), mask.to(device)


def _forward(model, ids):
    size, width = ids.shape
    dev = ids.device
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    meta = AttentionMetadata(
        positions=torch.arange(width, device=dev).repeat(size), slot_mapping=empty,
        block_tables=empty.int(), context_lens=empty.int(),
        query_start_loc=(torch.arange(size + 1, device=dev) * width).int(), block_size=1,
        max_query_len=width, max_context_len=width)
    hidden = model(ids.flatten(), meta, None)
    return model.compute_logits(hidden).view(size, width, -1)


@torch.no_grad()
def init_edge_embeddings(model, tokenizer, task, gen: torch.Generator) -> None:
    """A task with one token per edge (EDGE_TOKENS, "KQ") starts each edge's embedding as the sum of
    a vector for its first node and one for its second, as a model that knows the letters of its
    tokens would have them (a node's own token, " E" in "from E to B", gets both). With random
    embeddings the loss of a 4-layer model stayed at 1.9 for 2,000 steps; with these, 1.7."""
    edges = getattr(task, "EDGE_TOKENS", None)
    if not edges:
        return
    weight = model.embed_tokens.weight
    std = float(weight.std())
    first = torch.randn(128, weight.shape[1], generator=gen) * std / math.sqrt(2)
    second = torch.randn(128, weight.shape[1], generator=gen) * std / math.sqrt(2)
    for edge in edges:
        weight[tokenizer.convert_tokens_to_ids(edge)] = first[ord(edge[0])] + second[ord(edge[1])]
    for node in task.NODES:  # the source and target in the question ("from E to B") share both
        token = tokenizer.convert_tokens_to_ids("\u0120" + node)
        if token is not None and token != tokenizer.unk_token_id:
            weight[token] = first[ord(node)] + second[ord(node)]


def pretrain(out_dir: str | Path, cfg: PretrainConfig | None = None, device: str = "cpu",
             log=print, init_from: str | Path | None = None) -> dict:
    """Train from scratch, or go on from the checkpoint in init_from (its shape wins over cfg's)."""
    cfg = cfg or PretrainConfig()
    if cfg.check_wrong not in ("corrupt", "attempt"):
        raise ValueError(f"check_wrong is 'corrupt' or 'attempt', not {cfg.check_wrong!r}")
    if not 1 <= cfg.check_questions <= len(CHECK_QUESTIONS):
        raise ValueError(f"check_questions is 1 to {len(CHECK_QUESTIONS)}, not {cfg.check_questions!r}")
    if (cfg.attempt_frac or cfg.check_frac and cfg.check_wrong == "attempt") and not hasattr(
            load_task(cfg.task), "attempt"):
        raise ValueError(f"the {cfg.task} task has no wrong attempts (attempt_frac, check_wrong)")
    if cfg.partial_frac and not hasattr(load_task(cfg.task), "partial"):
        raise ValueError(f"the {cfg.task} task has no partial paths (partial_frac)")
    count = len(load_task(cfg.task).LEVELS)
    if cfg.levels is not None and not all(0 <= lv < count for lv in cfg.levels):
        raise ValueError(f"levels {cfg.levels!r}: the {cfg.task} task has levels 0-{count - 1}")
    if cfg.direct_frac and not hasattr(load_task(cfg.task).Problem, "direct"):
        raise ValueError(f"the {cfg.task} task has no direct answers: direct_frac must be 0")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    dev = torch.device(device)
    if init_from is not None:
        tokenizer = load_tokenizer(str(init_from))
        model, hf = load_model(str(init_from), dev, torch.float32)
        cfg = replace(cfg, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,  # what is trained
                      num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                      intermediate_size=hf.intermediate_size, max_positions=hf.max_position_embeddings)
    else:
        tokenizer = make_tokenizer(task=cfg.task)
        hf = hf_config(cfg, tokenizer)
        model = LlamaForCausalLM(ModelConfig.from_hf(hf)).to(dev)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.num_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else 1.0))
        model.init_rotary()
        init_edge_embeddings(model, tokenizer, load_task(cfg.task), torch.Generator().manual_seed(cfg.seed))
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    start, losses = time.perf_counter(), []
    model.train()
    with reference_only():
        for step in range(cfg.steps):
            ids, mask = _batch(tokenizer, rng, cfg.batch_size, dev, cfg.check_frac, cfg.direct_frac, cfg.task,
                               cfg.attempt_frac, cfg.check_wrong, cfg.check_questions, cfg.partial_frac,
                               cfg.levels)
            logits = _forward(model, ids)
            target = mask[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1][target], ids[:, 1:][target])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % 100 == 0 or step == 0:
                log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                    f"({time.perf_counter() - start:.0f}s)")
    model.eval()
    save_model(model, hf, tokenizer, out_dir)
    return {"config": asdict(cfg), "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "train_seconds": round(time.perf_counter() - start, 1),
            "params": sum(p.numel() for p in model.parameters()),
            "train_problems": cfg.steps * cfg.batch_size}
