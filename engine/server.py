"""OpenAI-compatible HTTP server over an AsyncEngine (FastAPI). `build_app(async_engine, name)`
returns the ASGI app, so another FastAPI or Starlette server can mount it; `selfeval serve` runs
it with uvicorn.

Endpoints: POST /v1/completions, POST /v1/chat/completions, POST /v1/score (extension), GET
/v1/models, GET /health, GET /metrics (Prometheus). Extensions beside the OpenAI fields: vLLM's
`ignore_eos`, `top_k` and `stop_token_ids`; `score_at` (generated lengths at which to score each
sample in place); `policy` ({"type": "best_of_n" | "adaptive" | "prune", ...} with the Python
API's parameter names); per choice `selfeval` ({score, p_yes, p_no, checkpoint_scores})."""

from __future__ import annotations

import asyncio
import json
import re
import reprlib
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.errors import EngineError, InvalidRequestError
from engine.policies import Adaptive, BestOfN, Policy, Prune, Scorer
from engine.sampling import RequestOutput, SamplingParams

MAX_BODY_BYTES = 4 << 20
POLICIES = {"best_of_n": BestOfN, "adaptive": Adaptive, "prune": Prune}


def _off(neutral):
    return lambda v: v is None or v == neutral


# OpenAI and vLLM request fields this server does not implement, each with the values that ask for
# nothing (accepted: clients send defaults); any other value is a 400 naming the field, never
# silently ignored (a penalty, logit bias or JSON mode dropped would change what comes back).
# Fields the server does not know at all are ignored, as vLLM ignores them.
UNSUPPORTED = {
    "frequency_penalty": _off(0), "presence_penalty": _off(0), "repetition_penalty": _off(1),
    "length_penalty": _off(1), "echo": _off(False), "suffix": _off(""),
    "logit_bias": lambda v: v is None or (isinstance(v, dict) and all(b == 0 for b in v.values())),
    "min_tokens": _off(0), "min_p": _off(0), "use_beam_search": _off(False), "prompt_logprobs": _off(None),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _off([]), "functions": _off([]), "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "guided_json": _off(None), "guided_regex": _off(None), "guided_choice": _off(None),
    "guided_grammar": _off(None), "structured_outputs": _off(None),
    "include_stop_str_in_output": _off(False), "skip_special_tokens": _off(True),
    "spaces_between_special_tokens": _off(True), "allowed_token_ids": _off(None), "bad_words": _off([]),
    "truncate_prompt_tokens": _off(None), "return_tokens_as_token_ids": _off(False),
    "add_generation_prompt": _off(True), "continue_final_message": _off(False), "chat_template": _off(None),
    "chat_template_kwargs": _off({}),
}
_HINTS = {"best_of": ' (for several samples and one pick, use "policy": {"type": "best_of_n", "n": K})'}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras: checked against UNSUPPORTED, then ignored
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool = False
    top_k: int | None = 0  # None as 0 (off)
    stop_token_ids: list[int] | None = None
    score_at: list[int] | None = None
    policy: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    max_tokens: int | None = 16


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class ScoreRequest(BaseModel):
    model: str
    prompt: str | list[str]
    response: str | list[str]
    chat: bool = True  # wrap each prompt in the chat template as a user turn


class ServerError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry = status, message, kind, param, retry


def _error(status: int, message: str, kind: str, param: str | None = None, retry: bool = False):
    headers = {} if retry else {"x-should-retry": "false"}
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "seed", "stop", "stop_token_ids", "logprobs", "ignore_eos", "policy", "score_at"}


def _param_of(message: str) -> str | None:
    """The request field an engine error message starts with ("top_p must be ...", "n=9 ...")."""
    first = re.split(r"[^a-z_]", message, maxsplit=1)[0]
    return first if first in FIELDS else None


class _LimitBody:
    """413 for a declared body over MAX_BODY_BYTES. Plain ASGI, not @app.middleware("http"):
    Starlette's BaseHTTPMiddleware relays every streamed chunk through an extra task and stream,
    which showed in the server's profile under load."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"")
            if size.isdigit() and int(size) > MAX_BODY_BYTES:
                response = _error(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, model_name: str, max_waiting: int | None = None,
              combined: Scorer | None = None) -> FastAPI:
    """The OpenAI-compatible ASGI app over `engine`. `combined`: the scorer a policy's
    `"scorer": "combined"` names (the adapter's fitted CombinedScorer; `selfeval serve` loads it
    from the adapter's combined.json when there is one)."""
    app = FastAPI(title="selfeval-engine")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def bad_fields(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                          "invalid_request_error")
        loc = first.get("loc", ())
        where = str(loc[1]) if len(loc) > 1 else None  # the field, not the union member tried
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                      "invalid_request_error", where)

    @app.exception_handler(ServerError)
    async def server_error(_, exc: ServerError):
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.retry)

    @app.exception_handler(EngineError)
    async def engine_error(_, exc: EngineError):
        if isinstance(exc, EngineDeadError):
            return _error(503, str(exc), "server_error", retry=True)
        status = 400 if isinstance(exc, InvalidRequestError) else 500
        return _error(status, str(exc), "invalid_request_error" if status == 400 else "server_error",
                      _param_of(str(exc)))

    app.add_middleware(_LimitBody)

    def check(req) -> None:
        for name, value in (getattr(req, "model_extra", None) or {}).items():
            if name == "best_of":  # OpenAI's best_of = n asks for nothing more
                asks = value is not None and value != getattr(req, "n", 1)
            else:
                asks = name in UNSUPPORTED and not UNSUPPORTED[name](value)
            if asks:
                raise ServerError(400, f"{name}={reprlib.repr(value)} is not supported by this server"
                                       f"{_HINTS.get(name, '')}", param=name)
        if req.model != model_name:
            raise ServerError(404, f"model {req.model!r} is not served here; this server serves "
                                   f"{model_name!r}", "not_found_error", "model")
        if max_waiting is not None and engine.stats().get("requests_waiting", 0) >= max_waiting:
            raise ServerError(503, f"over {max_waiting} requests are waiting; retry later",
                              "server_error", retry=True)

    def params_of(req, ids: list[int], max_tokens: int | None) -> SamplingParams:
        if max_tokens is None:  # as vLLM: what the context leaves (and the score's suffix, if scored)
            scored = req.n > 1 or req.policy is not None or bool(req.score_at)
            max_tokens = engine.inputs.default_max_tokens(ids, scored=scored)
        if isinstance(req, ChatRequest):
            if req.top_logprobs is not None and not req.logprobs:
                raise ServerError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            alternatives = req.top_logprobs or 0
        else:
            alternatives = req.logprobs or 0
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k or 0, 0),
                              max_tokens=max_tokens, n=req.n, seed=req.seed, stop=req.stop,
                              ignore_eos=req.ignore_eos, logprobs=alternatives,
                              stop_token_ids=req.stop_token_ids, score_at=tuple(req.score_at or ()))

    def policy_of(req) -> Policy | None:
        if req.policy is None:
            return None
        spec = dict(req.policy)
        kind = spec.pop("type", None)
        if kind not in POLICIES:
            raise ServerError(400, f"policy.type must be one of {sorted(POLICIES)}, got {kind!r}",
                              param="policy.type")
        if spec.get("scorer") == "combined":
            if combined is None:
                raise ServerError(400, "policy.scorer 'combined' needs the adapter's combined.json "
                                  "(python bench/combined_scorer.py --save); this server has none",
                                  param="policy.scorer")
            spec["scorer"] = combined
        try:
            return POLICIES[kind](**spec)
        except TypeError as e:
            raise ServerError(400, f"policy: {e}", param="policy") from e

    async def run(req, jobs: list[tuple], chat: bool, want_logprobs: bool):
        """Generate each (ids, params, policy) job; one response, choices in job order."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        rids = [rid] if len(jobs) == 1 else [f"{rid}-{j}" for j in range(len(jobs))]
        streams = [engine.generate(*job, request_id=r) for job, r in zip(jobs, rids)]
        tokenizer = engine.tokenizer
        try:
            if not req.stream:
                outputs = await asyncio.gather(*(_last(s) for s in streams), return_exceptions=True)
                outputs = _raise_first(outputs)
                parts = [_full_response(rid, created, model_name, o, chat, want_logprobs, tokenizer)
                         for o in outputs]
                choices = [dict(c, index=i) for i, c in enumerate(c for p in parts for c in p["choices"])]
                usage = {k: sum(p["usage"][k] for p in parts) for k in parts[0]["usage"]}
                return JSONResponse({**parts[0], "choices": choices, "usage": usage})
            # errors before the first byte become HTTP errors
            firsts = _raise_first(await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        lp = None
        if want_logprobs:
            lp = lambda d: _logprobs(tokenizer, d.token_ids, d.logprobs, d.top_logprobs, chat)  # noqa: E731
        policy = jobs[0][2] is not None
        width = 1 if policy else req.n
        return StreamingResponse(_sse(rid, created, model_name, firsts, streams, chat, lp, include_usage,
                                      policy, sum(len(job[0]) for job in jobs), width),
                                 media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check(req)
        batch = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], (str, list))
        jobs = []
        for prompt in req.prompt if batch else [req.prompt]:  # all validated before any is queued
            ids = engine.inputs.tokenize(prompt)
            params = params_of(req, ids, req.max_tokens)
            policy = policy_of(req)
            engine.inputs.validate(ids, params, policy)
            jobs.append((ids, params, policy))
        return await run(req, jobs, False, req.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check(req)
        ids = engine.inputs.render_chat(req.messages)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = params_of(req, ids, limit)
        return await run(req, [(ids, params, policy_of(req))], True, req.logprobs)

    @app.post("/v1/score")
    async def score(req: ScoreRequest):
        check(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        responses = [req.response] if isinstance(req.response, str) else req.response
        if req.chat:
            prompts = [engine.inputs.render_chat([{"role": "user", "content": p}]) for p in prompts]
        scores = await engine.score(prompts, responses)
        return {"object": "list", "model": model_name,
                "data": [{"index": i, "score": s} for i, s in enumerate(scores)]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "selfeval-engine",
                                            "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if not engine.is_running:
            raise ServerError(503, "the engine loop is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine.stats()), media_type="text/plain; version=0.0.4")

    return app


def _raise_first(results: list) -> list:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


async def _last(stream):
    output = None
    async for delta in stream:
        if delta.finished:
            output = delta.output
    return output


async def _first(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _selfeval(sample) -> dict | None:
    if sample.score is None and not sample.checkpoint_scores:
        return None
    return {"score": sample.score, "p_yes": sample.p_yes, "p_no": sample.p_no,
            "checkpoint_scores": [list(c) for c in sample.checkpoint_scores]}


def _reason(reason: str | None) -> str | None:
    return "stop" if reason == "pruned" else reason


def _choices(output: RequestOutput) -> list:
    """The samples a response shows: a policy's pick alone, else every sample."""
    if output.best_index is not None:
        return [output.best]
    return output.samples


def _logprobs(tokenizer, token_ids: list[int], logprobs: list[float], tops: list, chat: bool) -> dict:
    """The sampled tokens' log-probabilities (under the untempered model) and, when asked, the
    most likely alternatives at each position, in OpenAI's shapes."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    tops = [[(tokenizer.decode([t]), v) for t, v in top] for top in tops] if tops else [[] for _ in tokens]
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())}
                                              for a, v in top]}
                            for t, lp, top in zip(tokens, logprobs, tops)]}
    alternatives = None  # as vLLM: the alternatives and the sampled token, by text
    if any(tops):
        alternatives = [{**dict(top), t: lp} for t, lp, top in zip(tokens, logprobs, tops)]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": alternatives,
            "text_offset": None}


def _full_response(rid: str, created: int, model: str, output: RequestOutput, chat: bool,
                   want_logprobs: bool, tokenizer) -> dict:
    if output.error is not None:
        raise EngineError(output.error)
    choices = []
    for i, s in enumerate(_choices(output)):
        choice = {"index": i, "finish_reason": _reason(s.finish_reason),
                  "logprobs": (_logprobs(tokenizer, s.token_ids, s.logprobs, s.top_logprobs, chat)
                               if want_logprobs else None)}
        if chat:
            choice["message"] = {"role": "assistant", "content": s.text}
        else:
            choice["text"] = s.text
        if _selfeval(s) is not None:
            choice["selfeval"] = _selfeval(s)
        choices.append(choice)
    completion = sum(len(s.token_ids) for s in output.samples)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": completion,
                      "total_tokens": len(output.prompt_token_ids) + completion}}


async def _sse(rid, created, model, firsts, streams, chat, logprobs, include_usage, policy, prompt_tokens,
               width):
    """Server-sent events: text pieces as they come (a policy's pick once known), finish_reason
    only on each choice's last chunk, then usage if asked, then [DONE]. Several prompts stream
    interleaved in one response, prompt j's choices at indexes j * width + i (as vLLM)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    totals = {"completion": 0}

    def chunk(choices, usage=None):
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def events(j):
        return _events(firsts[j], streams[j], chat, logprobs, policy, chunk, j * width, totals)

    tasks = []
    try:
        if len(streams) == 1:
            async for event in events(0):
                yield event
        else:
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(j):
                try:
                    async for event in events(j):
                        queue.put_nowait(event)
                finally:
                    queue.put_nowait(None)

            tasks = [asyncio.create_task(pump(j)) for j in range(len(streams))]
            for _ in tasks:
                while (event := await queue.get()) is not None:
                    yield event
        if include_usage:
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": totals["completion"],
                             "total_tokens": prompt_tokens + totals["completion"]})
        yield "data: [DONE]\n\n"
    finally:  # the client left (or anything failed): no request may run on
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def _events(first, stream, chat, logprobs, policy, chunk, offset, totals):
    """One request's chunks; its choice indexes start at `offset`."""
    started = set()
    delta = first

    def piece(index, text, new):
        return _piece(offset + index, text, chat, new)

    while delta is not None:
        if delta.finished:
            output = delta.output
            if output.error is not None:
                yield f"data: {json.dumps({'error': {'message': output.error, 'type': 'server_error'}})}\n\n"
                break
            totals["completion"] += sum(len(s.token_ids) for s in output.samples)
            if policy:  # the pick is known only now: its whole text in one chunk
                s = output.best
                yield chunk([piece(0, s.text, 0 not in started)])
                started.add(0)
            tail = {} if policy else {d.index: d for d in delta.samples}  # what the last step added
            last = []
            for i, s in enumerate(_choices(output)):
                d = tail.get(s.index)
                p = piece(i, d.text if d else "", not policy and s.index not in started)
                if logprobs is not None and d is not None and d.token_ids:
                    p["logprobs"] = logprobs(d)
                p["finish_reason"] = _reason(s.finish_reason)
                if _selfeval(s) is not None:
                    p["selfeval"] = _selfeval(s)
                last.append(p)
            yield chunk(last)
            break
        if not policy:
            pieces = []
            for d in delta.samples:
                if d.text or d.token_ids or d.index not in started:
                    p = piece(d.index, d.text, d.index not in started)
                    if logprobs is not None and d.token_ids:
                        p["logprobs"] = logprobs(d)
                    pieces.append(p)
                    started.add(d.index)
            if pieces:
                yield chunk(pieces)
        try:
            delta = await stream.__anext__()
        except StopAsyncIteration:
            delta = None


def _piece(index: int, text: str, chat: bool, first: bool) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": None}


def _prometheus(stats: dict) -> str:
    """Prometheus text exposition of the engine's counters (prometheus_client's format)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    gauges = {"requests_running": "requests with a sequence running", "requests_waiting":
              "requests waiting to start", "kv_blocks_used": "KV blocks in use", "kv_blocks_cached":
              "KV blocks holding cached prefixes", "kv_blocks_total": "KV blocks in the pool"}
    counters = {"tokens_generated": "tokens generated", "score_calls": "self-evaluation scores computed",
                "scores_cached": "self-evaluation scores taken from the score cache",
                "samples_pruned": "samples pruned by policies", "steps": "engine steps",
                "step_seconds_total": "seconds spent in steps", "requests_finished": "requests finished",
                "steps_ran_ahead": "decode steps launched before the last one's tokens were back "
                                   "(async scheduling)"}

    class Collector:
        def collect(self):
            for name, text in gauges.items():
                yield GaugeMetricFamily(f"selfeval_{name}", text, value=stats.get(name, 0))
            for name, text in counters.items():
                yield CounterMetricFamily(f"selfeval_{name.removesuffix('_total')}", text,
                                          value=stats.get(name, 0))

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()
