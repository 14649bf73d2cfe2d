"""Engine: the thin synchronous front. Engine(model=DIR).generate(prompts, SamplingParams(...)).
It tokenizes and validates; EngineCore (engine.core) runs the steps."""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterable
from collections.abc import Sequence as Seq

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.errors import InvalidRequestError
from engine.inputs import InputProcessor, Limits, Prompt
from engine.policies.base import Policy
from engine.profiler import StepProfiler
from engine.sampling import RequestDelta, RequestOutput, SamplingParams, TokenDeltas


def _serialized(method):
    """One caller at a time: a second thread waits until the first call returns (the engine's
    state is not safe to share mid-call; an async server wants engine.async_engine instead)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Engine:
    """A paged-KV decoding engine with cheap fork and rollback and self-evaluation scoring.

    Engine(model_dir, **settings) or Engine(EngineConfig(...)); every setting is an EngineConfig
    field (engine.config): device, dtype, block_size, num_blocks, max_batch_tokens, max_num_seqs,
    max_model_len, kv_cache_memory, seed, cuda_graphs, adapter, load_format,
    enable_prefix_caching, tensor_parallel_size, tensor_parallel_timeout, async_scheduling.

    Thread-safe by serialization: calls from several threads run one after another."""

    def __init__(self, model: str | EngineConfig, **settings):
        if isinstance(model, EngineConfig):
            if settings:
                raise InvalidRequestError("give settings in the EngineConfig, not beside it")
            self.config = model
        else:
            unknown = set(settings) - EngineConfig.names()
            if unknown:
                raise InvalidRequestError(f"unknown engine settings {sorted(unknown)}; "
                                          f"see engine.config.EngineConfig")
            self.config = EngineConfig(model=str(model), **settings)
        self.core = EngineCore(self.config)
        self.model, self.tokenizer, self.spec = self.core.model, self.core.tokenizer, self.core.spec
        self.device, self.dtype = self.core.device, self.core.dtype
        self.max_model_len = self.core.max_model_len
        self.block_manager, self.runner = self.core.block_manager, self.core.runner
        self.inputs = InputProcessor(self.tokenizer, Limits(
            self.model.config.vocab_size, self.max_model_len, self.block_manager.num_blocks,
            self.block_manager.block_size, len(self.spec.suffix_ids)))
        self._request_ids = itertools.count()
        self._lock = threading.RLock()

    @property
    def profiler(self) -> StepProfiler | None:
        return self.core.profiler

    @profiler.setter
    def profiler(self, prof: StepProfiler | None) -> None:
        self.core.profiler = prof

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---- validation (engine.inputs) ------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        return self.inputs.tokenize(prompt)

    def validate(self, ids: list[int], params: SamplingParams, policy: Policy | None = None) -> None:
        """Raise InvalidRequestError for a request the engine cannot serve; queue nothing."""
        self.inputs.validate(ids, params, policy)

    # ---- stepping ------------------------------------------------------------------------
    @_serialized
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    policy: Policy | None = None) -> int:
        """Queue one request; returns its id. Invalid input raises and queues nothing.
        With a policy (engine.policies) the policy draws, scores and prunes the samples."""
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        self.validate(ids, params, policy)
        request_id = next(self._request_ids)
        self.core.add_request(request_id, ids, params, policy)
        return request_id

    @_serialized
    def step_deltas(self) -> list[RequestDelta]:
        """Run one step; a delta for every request that changed (streaming)."""
        return self.core.step()

    @_serialized
    def step_token_deltas(self) -> tuple[list[RequestDelta], TokenDeltas]:
        """step_deltas(), with each sample that drew one token and nothing else new as a row of a
        TokenDeltas: the same changes, cheap to send to another process. A request's other
        changes come in a delta beside its rows; rows.merge_into(deltas) gives step_deltas()'s
        list (one delta per request)."""
        rows = TokenDeltas()
        return self.core.step(rows=rows.rows), rows

    @_serialized
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that finished in it."""
        return [d.output for d in self.core.step(deltas=False) if d.finished]

    @_serialized
    def abort(self, request_id: int) -> None:
        self.core.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    @_serialized
    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (tensor_parallel_size > 1); nothing to do otherwise. The
        engine cannot step afterwards. Also `with Engine(...) as eng:`."""
        self.core.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @_serialized
    def score_in_flight(self, request_id: int) -> int:
        """Score every still-generating sample of a request in place at its current length
        during the next step (the form policies use). The result lands in the sample's
        checkpoint_scores as (generated tokens, score); decoding goes on unchanged.
        Returns how many samples will be scored."""
        request = self.core.requests.get(request_id)
        if request is None:
            raise InvalidRequestError(f"request {request_id} is not running")
        return self.core.score_now(request)

    # ---- batch entry points -------------------------------------------------------------
    @_serialized
    def generate(self, prompts: Prompt | Iterable[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | str = False, policy: Policy | Seq[Policy | None] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for every prompt (str tokenized as is, or token ids) in one continuous batch.
        params and policy: one for every prompt, or one per prompt (policy None: plain sampling).
        use_tqdm: a progress bar (a string names it). A bad prompt raises before anything is queued."""
        single_ids = isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        if isinstance(prompts, str) or single_ids:
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError(f"prompts must be a string, a list of token ids, or a list of "
                                      f"those; got {type(prompts).__name__}")
        prompts = list(prompts)
        params_list = _per_prompt(params or SamplingParams(), len(prompts), "sampling params")
        policies = _per_prompt(policy, len(prompts), "policies")
        token_ids = [self.tokenize(p) for p in prompts]
        for ids, sp, pol in zip(token_ids, params_list, policies):  # one bad prompt queues nothing
            self.validate(ids, sp, pol)
        request_ids = [self.add_request(ids, sp, pol)
                       for ids, sp, pol in zip(token_ids, params_list, policies)]
        return self.run_until_done(request_ids, use_tqdm)

    @_serialized
    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool | str = False, policy: Policy | Seq[Policy | None] | None = None,
             ) -> list[RequestOutput]:
        """Like generate, with each conversation rendered by the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.render_chat(c) for c in conversations], params, use_tqdm, policy)

    def render_chat(self, conversation: list[dict]) -> list[int]:
        return self.inputs.render_chat(conversation)

    @_serialized
    def score(self, prompts: Seq[Prompt], responses: Seq[Prompt]) -> list[float]:
        """Self-evaluation score in [0, 1] of each (prompt, response): one forward over the
        suffix after the cached prompt and response."""
        if isinstance(prompts, str) and isinstance(responses, str):
            prompts, responses = [prompts], [responses]
        if not (isinstance(prompts, (list, tuple)) and isinstance(responses, (list, tuple))):
            raise InvalidRequestError("give lists of prompts and responses (or one string each)")
        if len(prompts) != len(responses):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(responses)} responses")
        params = SamplingParams(max_tokens=0, score=True)
        joined = []
        for prompt, response in zip(prompts, responses):
            if isinstance(response, str):
                resp = self.tokenizer.encode(response, add_special_tokens=False)
            elif isinstance(response, (list, tuple)) and not response:
                resp = []  # an empty response, as "" is (not "the prompt is empty")
            else:
                resp = self.tokenize(response)
            joined.append(self.tokenize(prompt) + resp)
        outs = self.generate(joined, params)
        return [o.samples[0].score for o in outs]

    @_serialized
    def run_until_done(self, request_ids: list[int], use_tqdm: bool | str = False) -> list[RequestOutput]:
        """Step until every one of these requests finished; their outputs in that order."""
        pending = set(request_ids)
        results: dict[int, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc=use_tqdm if isinstance(use_tqdm, str) else "requests",
                       unit="req")
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:  # interrupted: this call's requests leave nothing behind
            for request_id in pending:
                self.abort(request_id)
            raise
        finally:
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
