"""Engine: the public face. Engine(model=DIR).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq

import numpy as np
import torch

import kernels
from engine._core import BlockManager
from engine.errors import InvalidRequestError
from engine.model.loader import load_model, load_tokenizer
from engine.model.lora import has_adapter, load_adapter
from engine.policies.base import Policy, PolicyRun
from engine.policies.scorers import token_confidence
from engine.profiler import StepProfiler, StepRecord
from engine.runner import ModelRunner, kv_bytes_per_block
from engine.sampling import RequestOutput, Sample, SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.selfeval import SelfEvalSpec, build_spec, score_from_logits
from engine.sequence import Request, SeqStatus, Sequence, sample_seed

Prompt = str | list[int]
_no_phase = contextlib.nullcontext


def _step_record(batch: ScheduledBatch, seconds: float) -> StepRecord:
    real = batch.num_real
    suffix = sum(len(x) for x in batch.suffixes)
    decode = sum(1 for s, n, x in zip(batch.seqs, real, batch.suffixes)
                 if n == 1 and s.num_computed + 1 == len(s.token_ids))
    prefill = sum(real) - decode
    kind = "prefill" if prefill else ("score" if suffix else "decode")
    context = sum(s.num_computed + n for s, n in zip(batch.seqs, real))
    return StepRecord(kind, len(batch), prefill, decode, suffix, context, seconds)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    """A paged-KV decoding engine with cheap fork and rollback and self-evaluation scoring.

    model: a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer).
    num_blocks: KV blocks of block_size tokens; by default what kv_cache_memory bytes hold
    (CPU: 1 GiB; CUDA: 85% of the free memory after the weights).
    max_batch_tokens: tokens one step computes at most (decodes + prefill chunks + suffixes).
    cuda_graphs: replay captured CUDA graphs for pure decode steps (default: on for CUDA).
    adapter: a self-evaluation LoRA adapter directory, applied to the suffix tokens only.
    load_format: "dummy" fills random weights instead of reading them (benchmarks of a shape).
    """

    def __init__(self, model: str, device: str = "cpu", dtype: torch.dtype | None = None,
                 block_size: int = 16, num_blocks: int | None = None, max_batch_tokens: int = 2048,
                 max_num_seqs: int = 256, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, seed: int | None = None,
                 cuda_graphs: bool | None = None, adapter: str | None = None,
                 load_format: str = "auto"):
        self.device = torch.device(device)
        self.dtype = dtype or _default_dtype(self.device)
        self.model, self.hf_config = load_model(model, self.device, self.dtype, load_format)
        self.tokenizer = load_tokenizer(model)
        if adapter is not None:
            load_adapter(self.model, adapter)
        self.spec: SelfEvalSpec = build_spec(self.tokenizer)
        cfg = self.model.config
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        if max_batch_tokens < len(self.spec.suffix_ids) + 1:
            raise InvalidRequestError(
                f"max_batch_tokens={max_batch_tokens} is below the self-evaluation suffix "
                f"({len(self.spec.suffix_ids)} tokens) plus one")
        if num_blocks is None:
            num_blocks = self._blocks_that_fit(block_size, kv_cache_memory)
        self.block_manager = BlockManager(num_blocks, block_size)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.runner = ModelRunner(self.model, self.block_manager, self.device, self.dtype,
                                  self.max_model_len, graphs="cuda" if cuda_graphs else None,
                                  max_graph_batch=max_num_seqs)
        self.runner.adapter_loaded = has_adapter(self.model)
        self.scheduler = Scheduler(self.block_manager, self.spec, max_batch_tokens, max_num_seqs)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._requests: dict[int, Request] = {}
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = random.Random(seed)
        self._ready: list[Request] = []  # finished without a step (max_tokens=0, no score)
        self.profiler: StepProfiler | None = None  # attach one to time each step's phases

    # ---- sizing -------------------------------------------------------------------------
    def _blocks_that_fit(self, block_size: int, kv_cache_memory: int | None) -> int:
        per_block = kv_bytes_per_block(self.model, block_size, self.dtype)
        if kv_cache_memory is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_memory = int(free * 0.85)
            else:
                kv_cache_memory = 1 << 30
        # 2^20 blocks bound the pool (int32 block ids, and a sane host-side free list).
        return max(1, min(kv_cache_memory // per_block, 1 << 20))

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---- requests -----------------------------------------------------------------------
    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def _validate(self, ids: list[int], params: SamplingParams, policy: Policy | None = None) -> None:
        if policy is not None and params.n != 1:
            raise InvalidRequestError("a policy draws its own samples: leave n at 1")
        scored = params.wants_score or params.score_at or policy is not None
        suffix = len(self.spec.suffix_ids) if scored else 0
        total = len(ids) + params.max_tokens + suffix
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} + suffix {suffix} "
                f"= {total} exceeds max_model_len {self.max_model_len}; shorten the prompt or "
                f"lower max_tokens")
        blocks = -(-total // self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"one sample needs {blocks} KV blocks but the cache has "
                f"{self.block_manager.num_blocks}; raise num_blocks or lower max_tokens")

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    policy: Policy | None = None) -> int:
        """Queue one request; returns its id. Invalid input raises and queues nothing.
        With a policy (engine.policies) the policy draws, scores and prunes the samples."""
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        self._validate(ids, params, policy)
        request_id = next(self._request_ids)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        request = Request(request_id, ids, params, seed)
        if policy is not None:
            self._requests[request_id] = request
            self._start_policy(request, policy)
            return request_id
        seq = Sequence(next(self._seq_ids), request, ids, 0, sample_seed(seed, 0))
        request.seqs.append(seq)
        self._requests[request_id] = request
        if params.max_tokens == 0:
            self._finish(seq, "length")
        if seq.status is SeqStatus.FINISHED:  # nothing to compute
            self._ready.append(request)
        else:
            self.scheduler.add(seq)
        return request_id

    # ---- policies -------------------------------------------------------------------------
    def _start_policy(self, request: Request, policy: Policy) -> None:
        """The root holds the prompt's cache (all but its last token); samples fork off it and
        each computes the last prompt token itself, which gives its first next-token row."""
        scorer = policy.scorer
        request.wants_score = scorer.needs_suffix
        if scorer.needs_suffix:
            request.score_at = tuple(sorted(set(request.score_at) | set(policy.checkpoints())))
        request.track_confidence = request.track_confidence or scorer.needs_confidence
        request.forked = True
        root = Sequence(next(self._seq_ids), request, request.prompt_ids[:-1], -1, request.seed)
        root.is_root, root.finish_reason = True, "root"
        request.root = root
        request.seqs.append(root)
        if root.token_ids:
            self.scheduler.add(root)
        else:  # a one-token prompt: nothing to cache
            self.block_manager.allocate(root.seq_id, 0)
            root.status = SeqStatus.RUNNING
            self.scheduler.running.append(root)
        request.policy = PolicyRun(policy, self, request)
        policy.begin(request.policy)

    def _spawn_ready(self, run: PolicyRun) -> None:
        """Fork the samples a policy asked for once the root's cache is complete."""
        request, root = run.request, run.request.root
        if root.status is not SeqStatus.RUNNING or root.num_computed < len(root.token_ids):
            return
        for temperature in run._pending:
            index = len(request.samples)
            child = Sequence(next(self._seq_ids), request, request.prompt_ids, index,
                             sample_seed(request.seed, index))
            child.temperature = temperature
            request.seqs.append(child)
            self.scheduler.fork(root, child)
            request.stats.samples_drawn += 1
        run._pending.clear()

    def _drive_policies(self) -> list[Request]:
        """Let every policy act on the step's results; returns the requests it touched."""
        touched = []
        for request in list(self._requests.values()):
            run = request.policy
            if run is None or run.done:
                continue
            self._spawn_ready(run)
            run.policy.update(run)
            touched.append(request)
        return touched

    def abort(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if seq.status is not SeqStatus.FINISHED:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.release(seq)

    def score_in_flight(self, request_id: int) -> int:
        """Score every still-generating sample of a request in place at its current length
        during the next step (the form policies use). The result lands in the sample's
        checkpoint_scores as (generated tokens, score); decoding goes on unchanged.
        Returns how many samples will be scored."""
        request = self._requests.get(request_id)
        if request is None:
            raise InvalidRequestError(f"request {request_id} is not running")
        live = [s for s in request.seqs if s.generating and s.status is not SeqStatus.FINISHED]
        for seq in live:
            seq.pending_score = True
        return len(live)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the requests that finished in it."""
        prof = self.profiler
        phase = prof.phase if prof is not None else _no_phase
        ready, self._ready = self._ready, []
        done = [self._output(r) for r in ready if self._requests.pop(r.request_id, None)]
        with phase("schedule"):
            batch = self.scheduler.schedule()
        if not len(batch):
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler could not place any sequence: KV cache too small")
            return done
        sample_rows, score_rows, scored = batch.rows()
        start = time.perf_counter()
        with phase("forward"):
            logits = self.runner.run([s.seq_id for s in batch.seqs], batch.chunks(),
                                     np.concatenate([sample_rows, score_rows]),
                                     [len(x) for x in batch.suffixes], phase)
        if prof is not None:
            prof.steps.append(_step_record(batch, time.perf_counter() - start))
        self.scheduler.finish_chunk(batch)
        if len(score_rows):
            with phase("score"):
                self._record_scores(batch, scored, logits[len(sample_rows):])
        if len(sample_rows):
            with phase("sample"):
                self._sample(batch, logits[:len(sample_rows)])
        with phase("policy"):
            touched = self._drive_policies()
            return done + self._collect_finished([s.request for s in batch.seqs] + touched)

    def _record_scores(self, batch: ScheduledBatch, scored: np.ndarray, logits: torch.Tensor) -> None:
        values = score_from_logits(logits, self.spec).tolist()
        for seq, suffix, (score, p_yes, p_no) in zip(
                itertools.compress(batch.seqs, scored), itertools.compress(batch.suffixes, scored), values):
            stats = seq.request.stats
            stats.score_calls += 1
            stats.suffix_tokens += len(suffix)
            if seq.generating or seq.num_generated in seq.request.score_at:
                seq.checkpoint_scores.append((seq.num_generated, score))
            if not seq.generating:
                seq.score = (score, p_yes, p_no)
                self.scheduler.release(seq)

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        seqs = [s for s, n in zip(batch.seqs, batch.num_real)
                if s.generating and n > 0 and s.num_computed == len(s.token_ids)]
        # A request with n > 1 forks its samples off the prompt's last row, sharing its blocks.
        rows = list(range(len(seqs)))
        for i, parent in enumerate(list(seqs)):
            request = parent.request
            if request.forked:
                continue
            request.forked = True
            for index in range(1, request.params.n):
                child = Sequence(next(self._seq_ids), request, parent.token_ids, index,
                                 sample_seed(request.seed, index))
                request.seqs.append(child)
                self.scheduler.fork(parent, child)
                seqs.append(child)
                rows.append(i)
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        params = [s.request.params for s in seqs]
        dev = logits.device
        confident = [i for i, s in enumerate(seqs) if s.request.track_confidence]
        if confident:
            conf = token_confidence(logits[torch.tensor(confident, device=dev)]).tolist()
            for i, c in zip(confident, conf):
                seqs[i].confidences.append(c)
        tokens, logprobs = kernels.sample(
            logits,
            torch.tensor([s.temperature for s in seqs], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
            torch.tensor([s.num_generated for s in seqs], dtype=torch.int64, device=dev),
        )
        for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            seq.request.stats.generated_tokens += 1
            self._check_stop(seq, token)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif params.stop and self._hit_stop_string(seq):
            reason = "stop"
        elif seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        else:
            if seq.num_generated in seq.request.score_at:
                seq.pending_score = True
            return
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Generation ended: score the sample if asked (one more extend), else release it."""
        seq.finish_reason = reason
        if seq.request.wants_score or seq.num_generated in seq.request.score_at:
            seq.pending_score = True
        elif seq.status is not SeqStatus.WAITING:
            self.scheduler.release(seq)
        else:
            seq.status = SeqStatus.FINISHED  # never queued: nothing to release

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Whether the tail of the generated text holds a stop string."""
        params = seq.request.params
        window = min(max(len(s) for s in params.stop) + 8, seq.num_generated)  # tokens >= 1 char
        text = self.tokenizer.decode(seq.token_ids[-window:], skip_special_tokens=True)
        return any(s in text for s in params.stop)

    def _collect_finished(self, requests: list[Request]) -> list[RequestOutput]:
        done = []
        for request in {r.request_id: r for r in requests}.values():
            if request.finished and request.request_id in self._requests:
                del self._requests[request.request_id]
                done.append(self._output(request))
        return done

    def _output(self, request: Request) -> RequestOutput:
        samples = []
        scorer = request.policy.scorer if request.policy is not None else None
        for seq in request.samples:
            gen = seq.token_ids[request.num_prompt:]
            text = self.tokenizer.decode(gen, skip_special_tokens=True)
            for stop in request.params.stop:
                cut = text.find(stop)
                if cut >= 0:
                    text = text[:cut]
            score = seq.score or (None, None, None)
            samples.append(Sample(seq.index, gen, text, seq.finish_reason, *score,
                                  checkpoint_scores=list(seq.checkpoint_scores),
                                  logprobs=list(seq.logprobs), confidences=list(seq.confidences),
                                  pruned_at=seq.pruned_at,
                                  temperature=seq.temperature,
                                  value=scorer(seq) if scorer is not None else score[0]))
        request.stats.latency_s = time.perf_counter() - request.arrival
        return RequestOutput(request.request_id, request.prompt_ids, samples, request.stats,
                             request.best_index)

    # ---- batch entry points -------------------------------------------------------------
    def generate(self, prompts: Prompt | Iterable[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, policy: Policy | Seq[Policy | None] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for every prompt (str tokenized as is, or token ids) in one continuous batch.
        params and policy: one for every prompt, or one per prompt (policy None: plain sampling).
        A bad prompt raises before anything is queued."""
        single_ids = isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        if isinstance(prompts, str) or single_ids:
            prompts = [prompts]
        prompts = list(prompts)
        params_list = _per_prompt(params or SamplingParams(), len(prompts), "sampling params")
        policies = _per_prompt(policy, len(prompts), "policies")
        token_ids = [self._tokenize(p) for p in prompts]
        for ids, sp, pol in zip(token_ids, params_list, policies):  # one bad prompt queues nothing
            self._validate(ids, sp, pol)
        request_ids = [self.add_request(ids, sp, pol)
                       for ids, sp, pol in zip(token_ids, params_list, policies)]
        return self._run_until_done(request_ids, use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False, policy: Policy | Seq[Policy | None] | None = None,
             ) -> list[RequestOutput]:
        """Like generate, with each conversation rendered by the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True)
                   for c in conversations]
        prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
                   for p in prompts]
        return self.generate(prompts, params, use_tqdm, policy)

    def score(self, prompts: Seq[Prompt], responses: Seq[Prompt]) -> list[float]:
        """Self-evaluation score in [0, 1] of each (prompt, response): one forward over the
        suffix after the cached prompt and response."""
        if len(prompts) != len(responses):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(responses)} responses")
        params = SamplingParams(max_tokens=0, score=True)
        joined = []
        for prompt, response in zip(prompts, responses):
            resp = (self.tokenizer.encode(response, add_special_tokens=False)
                    if isinstance(response, str) else [int(t) for t in response])
            joined.append(self._tokenize(prompt) + resp)
        outs = self.generate(joined, params)
        return [o.samples[0].score for o in outs]

    def _run_until_done(self, request_ids: list[int], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        results: dict[int, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="requests", unit="req")
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in request_ids]


def _per_prompt(value, count: int, what: str) -> list:
    """One value for every prompt, or a list with one per prompt."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise InvalidRequestError(f"{count} prompts but {len(value)} {what}")
    return list(value)
