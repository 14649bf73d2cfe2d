"""Training data: sample N responses per prompt with the engine, reward each, give each the
win-tie target, and add mid-generation examples whose target is estimated by completing the
prefix k times (DESIGN.md, training targets). One JSON line per example."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from engine.api import Engine
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams, mix_seed, seeds_per_prompt

# reward(record, response_text) -> float; record is the prompt's JSON object.
RewardFn = Callable[[dict, str], float]


TARGETS = ("win-tie", "win-half", "reward")


def win_tie_targets(rewards: list[float], kind: str = "win-tie") -> list[float]:
    """Each sample's target against the other samples of its prompt (win_tie_against)."""
    return [win_tie_against(r, rewards[:i] + rewards[i + 1:], kind) for i, r in enumerate(rewards)]


def win_tie_against(reward: float, others: list[float], kind: str = "win-tie") -> float:
    """The target of a sample with this reward beside the others of its prompt:
    win-tie (the paper): the share of the others it is not worse than, #{r_j <= r} / (N - 1); ties
        count as wins, so it says "sampling again would not do better" (the capability-aware
        meaning adaptive stopping needs), and with a binary verifier every sample of an all-wrong
        group gets 1.0;
    win-half: ties count half, (#{r_j < r} + #{r_j = r} / 2) / (N - 1), which keeps right above wrong
        within every prompt and puts an all-right or all-wrong group at 0.5;
    reward: the sample's own reward (a verifier's 0/1: P(right))."""
    if kind == "reward":
        if not 0.0 <= reward <= 1.0:
            raise InvalidRequestError(f"reward targets are P(right), in [0, 1]; got a reward of {reward} "
                                      "(a reward model's raw value?): use win-tie or win-half")
        return float(reward)
    if kind not in TARGETS:
        raise InvalidRequestError(f"unknown target kind {kind!r}: one of {', '.join(TARGETS)}")
    if not others:
        return 0.5
    ties = sum(r == reward for r in others)
    wins = sum(r < reward for r in others) + (ties if kind == "win-tie" else ties / 2)
    return wins / len(others)


def load_verifier(spec: str) -> RewardFn:
    """'package.module:function' -> the function."""
    module, _, name = spec.partition(":")
    if not name:
        raise InvalidRequestError(f"a verifier is given as module:function, not {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InvalidRequestError(f"cannot load the verifier {spec!r}: {e}") from e


def reward_model_fn(path: str, device: str = "cpu") -> Callable[[list[dict], list[str]], list[float]]:
    from engine.policies.scorers import RewardModelScorer

    rm = RewardModelScorer(path, device)
    return lambda records, texts: rm.score_texts([r["prompt"] for r in records], texts)


def read_prompts(path: str | Path) -> list[dict]:
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path} line {i + 1}: not JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise InvalidRequestError(f"{path} line {i + 1}: needs a string 'prompt' field")
        records.append(rec)
    if not records:
        raise InvalidRequestError(f"{path} holds no prompts (one JSON object with a 'prompt' per line)")
    return records


def build_examples(
    engine: Engine, records: list[dict], reward: RewardFn | None = None,
    batch_reward: Callable[[list[dict], list[str]], list[float]] | None = None, n: int = 8,
    checkpoints: Iterable[int] = (16, 32), completions: int = 4, params: SamplingParams | None = None,
    chat: bool = True, use_tqdm: bool = True, targets: str = "win-tie",
) -> Iterator[dict]:
    """Yield end-of-response and mid-generation examples for every prompt record. A mid-generation
    example's target is the mean over its completions of the target of the completed sample
    (win_tie_against; with targets="reward", P(right | prefix))."""
    if (reward is None) == (batch_reward is None):
        raise InvalidRequestError("give exactly one of a verifier (reward) or a reward model")
    win_tie_against(0.0, [], targets)  # an unknown kind fails before any sampling
    score = batch_reward or (lambda recs, texts: [float(reward(r, t)) for r, t in zip(recs, texts)])
    params = params or SamplingParams(temperature=1.0, max_tokens=128)
    sample = SamplingParams(**{**params.__dict__, "n": n, "score": False, "score_at": ()})
    prompts = [_prompt_ids(engine, r["prompt"], chat) for r in records]
    checkpoints = sorted(set(checkpoints))
    bar = None
    if use_tqdm:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="build-data", unit="prompt")
    step = max(1, 256 // n)  # prompts per engine call: one continuous batch of ~256 samples
    for lo in range(0, len(records), step):
        recs, ids = records[lo:lo + step], prompts[lo:lo + step]
        outs = engine.generate(ids, seeds_per_prompt(sample, len(ids), lo))
        rewards = [score([rec] * len(o.samples), [s.text for s in o.samples]) for rec, o in zip(recs, outs)]
        for rec, pid, out, rew in zip(recs, ids, outs, rewards):
            for s, r, t in zip(out.samples, rew, win_tie_targets(rew, targets)):
                yield {"prompt_ids": pid, "response_ids": s.token_ids, "target": t, "reward": r,
                       "kind": "end", "prompt": rec["prompt"]}
        # Mid-generation: complete every prefix `completions` times, all in one batch.
        jobs = [(k, i, c) for k, out in enumerate(outs) for c in checkpoints
                for i, s in enumerate(out.samples) if len(s.token_ids) > c]
        if jobs:
            cont = [replace(sample, n=completions, max_tokens=max(params.max_tokens - c, 1),
                            seed=None if sample.seed is None else mix_seed(sample.seed, lo + k, i, c))
                    for k, i, c in jobs]  # a seed of its own for every prefix
            starts = [ids[k] + outs[k].samples[i].token_ids[:c] for k, i, c in jobs]
            done = engine.generate(starts, cont)
            for (k, i, c), d in zip(jobs, done):
                prefix = outs[k].samples[i].token_ids[:c]
                full = [engine.tokenizer.decode(prefix + x.token_ids, skip_special_tokens=True)
                        for x in d.samples]
                others = rewards[k][:i] + rewards[k][i + 1:]
                ends = score([recs[k]] * len(full), full)
                target = sum(win_tie_against(r, others, targets) for r in ends) / len(full)
                yield {"prompt_ids": ids[k], "response_ids": prefix, "target": target,
                       "reward": rewards[k][i], "kind": "mid", "checkpoint": c, "prompt": recs[k]["prompt"]}
        if bar is not None:
            bar.update(len(recs))
    if bar is not None:
        bar.close()


def _prompt_ids(engine: Engine, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return engine.tokenizer.encode(prompt, add_special_tokens=True)
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                               add_generation_prompt=True)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def write_jsonl(examples: Iterable[dict], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
            count += 1
    return count
