"""`selfeval serve` against the official openai client (a live server subprocess on 127.0.0.1):
completions and chat, streaming and not, n > 1, stop, seeds, logprobs, usage, a policy, /v1/score,
the error shapes, a client that leaves mid-stream; and the app mounted inside another app."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

openai = pytest.importorskip("openai")

from engine import Engine, SamplingParams  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402
from engine.server import build_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(llama_dir, *extra):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--model", str(llama_dir),
                             "--port", str(port), "--served-model-name", "m", "--block-size", "4", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    return proc, url


@pytest.fixture(scope="module")
def server(llama_dir):
    proc, url = _launch(llama_dir)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _engine_process(pid: int) -> int:
    """The pid of the engine's process among the server's children (not the resource tracker)."""
    (child,) = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return child


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _metrics(url) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_completion_equals_the_engine_and_streams_the_same_text(server, client, llama_dir):
    eng = Engine(str(llama_dir), block_size=4)
    ref = eng.generate(["Hello there"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    prompt_tokens, ref = len(ref.prompt_token_ids), ref.samples[0]
    out = client.completions.create(model="m", prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True}, logprobs=1)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == prompt_tokens
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    chunks = list(client.completions.create(model="m", prompt="Hello there", max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert not any(c.choices[0].logprobs for c in chunks if c.choices), "logprobs only when asked"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == ref.text and reasons[-1] == "length" and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == 12
    chunks = list(client.completions.create(model="m", prompt="Hello there", max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True, logprobs=1))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(ref.logprobs, abs=1e-4)  # every token's, the last one's too


def test_chat_n_streams_are_told_apart_by_index_and_seeds_repeat(client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=3, seed=7,
              temperature=1.0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in full.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in full.choices}) > 1
    texts, reasons = {}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                assert c.index not in reasons, "finish_reason twice"
                reasons[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == [c.message.content for c in full.choices]
    assert reasons == {0: "length", 1: "length", 2: "length"}


def test_async_scheduling_serves_the_same_outputs(client, llama_dir):
    proc, url = _launch(llama_dir, "--async-scheduling")
    try:
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        chat = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, n=3, seed=7,
                    temperature=1.0, extra_body={"ignore_eos": True})
        plain = dict(model="m", prompt="Hello there", max_tokens=12, temperature=0, logprobs=1)
        for c in (client, other):
            c.results = ([x.message.content for x in c.chat.completions.create(**chat).choices],
                         "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(
                             stream=True, **{**chat, "n": 1}) if x.choices),
                         c.completions.create(**plain).choices[0].logprobs.tokens)
        assert other.results == client.results and len(set(client.results[0])) > 1
        assert _metrics(url)["selfeval_steps_ran_ahead_total"] > 0
        assert _metrics(str(client.base_url).removesuffix("/v1/"))["selfeval_steps_ran_ahead_total"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_list_of_prompts_gives_their_choices_in_order(client):
    kw = dict(model="m", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    one = [client.completions.create(prompt=p, **kw).choices[0].text for p in ("ab", "cd")]
    both = client.completions.create(prompt=["ab", "cd"], **kw)
    assert [c.text for c in both.choices] == one and [c.index for c in both.choices] == [0, 1]
    assert both.usage.completion_tokens == 10
    # Streamed: prompt j's sample i is choice j * n + i; usage sums every prompt's.
    kw = dict(kw, n=2, temperature=1.0, seed=3)
    full = client.completions.create(prompt=["ab", "cd"], **kw)
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(prompt=["ab", "cd"], stream=True,
                                           stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                assert c.index not in reasons, "finish_reason twice"
                reasons[c.index] = c.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert reasons == dict.fromkeys(range(4), "length") and usage.completion_tokens == 20
    assert usage.prompt_tokens == full.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):  # a bad prompt in the list: nothing streams
        client.completions.create(prompt=["ab", [10**9]], stream=True, **kw)


def test_top_logprobs_in_completions_and_chat(client):
    kw = dict(model="m", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    out = client.completions.create(prompt="ab", logprobs=3, **kw).choices[0].logprobs
    assert len(out.top_logprobs) == 4
    for token, lp, top in zip(out.tokens, out.token_logprobs, out.top_logprobs):
        assert token in top and top[token] == pytest.approx(lp) and lp == pytest.approx(max(top.values()))
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kw)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)  # greedy
    chunks = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, stream=True,
                                            **kw)
    streamed = [c for chunk in chunks for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [(c.token, [t.token for t in c.top_logprobs]) for c in streamed] == \
        [(c.token, [t.token for t in c.top_logprobs]) for c in content]
    for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(messages=messages, **bad, **kw)


def test_chat_without_max_tokens_fills_what_the_context_leaves(client):
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2,
                                         seed=2, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens > 100 and {c.finish_reason for c in out.choices} == {"length"}


def test_stop_policy_and_score_extensions(server, client):
    free = client.completions.create(model="m", prompt="abc", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[4:6]
    cut = client.completions.create(model="m", prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.startswith(cut.text)
    picked = client.completions.create(model="m", prompt="abc", max_tokens=6, seed=1,
                                       extra_body={"policy": {"type": "best_of_n", "n": 3}})
    assert len(picked.choices) == 1 and 0 <= picked.choices[0].model_extra["selfeval"]["score"] <= 1
    scores = httpx.post(f"{server}/v1/score", json={"model": "m", "prompt": ["a", "b"],
                                                     "response": ["c", "d"]}).json()
    assert [d["index"] for d in scores["data"]] == [0, 1]
    assert all(0 <= d["score"] <= 1 for d in scores["data"])
    # the same pairs again: from the engine's score cache, counted apart from computed scores
    before = _metrics(server)
    again = httpx.post(f"{server}/v1/score", json={"model": "m", "prompt": ["a", "b"],
                                                    "response": ["c", "d"]}).json()
    after = _metrics(server)
    assert [d["score"] for d in again["data"]] == [d["score"] for d in scores["data"]]
    assert after["selfeval_scores_cached_total"] - before["selfeval_scores_cached_total"] == 2
    assert after["selfeval_score_calls_total"] == before["selfeval_score_calls_total"]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"model": "m", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": "m", "prompt": "a", "top_p": "high"}, 400, "top_p"),
    ({"model": "m", "prompt": "a", "n": 0}, 400, "n"),
    ({"model": "m", "prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "m", "prompt": [1] * 5000}, 400, "prompt"),
    ({"model": "m", "prompt": "a", "policy": {"type": "magic"}}, 400, "policy.type"),
    ({"model": "m", "prompt": "a", "policy": {"type": "best_of_n", "m": 3}}, 400, "policy"),
    ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": "a", "seed": 2**70}, 400, "seed"),
    ({"model": "m", "prompt": None}, 400, "prompt"),
    ({"model": "m", "prompt": "a", "n": 10**9}, 400, "n"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and r.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("logit_bias", {"5": 100}), ("best_of", 3),
    ("response_format", {"type": "json_object"}), ("echo", True), ("repetition_penalty", 1.2),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("min_tokens", 4), ("min_p", 0.1),
    ("skip_special_tokens", False), ("prompt_logprobs", 0), ("add_generation_prompt", False),
    ("chat_template", "{{ messages }}"), ("logit_bias", {"5": 0, "6": -100}),
])
def test_fields_this_server_does_not_implement_are_refused_not_ignored(client, field, value):
    """A penalty, logit bias, JSON mode or tool dropped silently would change what comes back
    without a word: a 400 naming the field (through the openai client, chat and completions)."""
    for create, kw in ((client.completions.create, {"prompt": "abc"}),
                       (client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]})):
        with pytest.raises(openai.BadRequestError) as e:
            create(model="m", max_tokens=2, extra_body={field: value}, **kw)
        assert e.value.body["param"] == field and "not supported" in e.value.body["message"]


def test_their_default_values_and_unknown_fields_are_accepted(client):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {"5": 0}, "best_of": 2,
               "echo": False, "response_format": {"type": "text"}, "tool_choice": "none", "tools": [],
               "min_tokens": 0, "repetition_penalty": 1, "min_p": 0, "skip_special_tokens": True,
               "add_generation_prompt": True, "prompt_logprobs": None, "some_client_field": {"x": 1}}
    out = client.completions.create(model="m", prompt="abc", max_tokens=3, n=2, temperature=0,
                                    extra_body={**neutral, "ignore_eos": True})
    assert [c.finish_reason for c in out.choices] == ["length", "length"] and out.usage.completion_tokens == 6
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2, presence_penalty=0, frequency_penalty=0,
                                          tool_choice="none")
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_chat_max_completion_tokens_zero_and_a_null_top_k(client):
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=0, extra_body={"top_k": None})
    assert chat.usage.completion_tokens == 0 and chat.choices[0].finish_reason == "length"


def test_stop_token_ids_and_score_at_reach_the_engine(client, llama_dir):
    """vLLM's stop_token_ids and our score_at are request fields, not silently dropped ones."""
    eng = Engine(str(llama_dir), block_size=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    stop_id = eng.generate(["Hello there"], greedy)[0].samples[0].token_ids[3]
    ref = eng.generate(["Hello there"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0].samples[0]
    assert ref.finish_reason == "stop" and len(ref.token_ids) <= 4
    out = client.completions.create(model="m", prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text, "stop")
    assert out.usage.completion_tokens == len(ref.token_ids)
    scored = client.completions.create(model="m", prompt="Hello there", max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True, "score_at": [2]})
    [[at, score]] = scored.choices[0].model_extra["selfeval"]["checkpoint_scores"]
    assert at == 2 and 0 <= score <= 1


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": 5}], [{"role": "user"}], "hi"])
def test_bad_chat_messages_get_400(server, messages):
    body = {"model": "m", "messages": messages, "max_tokens": 2}
    r = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_malformed_and_huge_bodies_and_the_server_is_unharmed(server, client):
    as_json = {"content-type": "application/json"}
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers=as_json)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", content=b"x" * (5 << 20), headers=as_json)
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="a", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(model="m", prompt="a", max_tokens=3).usage.completion_tokens <= 3
    assert client.models.list().data[0].id == "m"


def test_a_client_leaving_mid_stream_frees_its_blocks(server):
    body = {"model": "m", "prompt": "long", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    steps_before = _metrics(server)["selfeval_steps_total"]
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
    deadline = time.time() + 20
    while time.time() < deadline:
        m = _metrics(server)
        if m["selfeval_kv_blocks_used"] == 0 and m["selfeval_requests_running"] == 0:
            break
        time.sleep(0.1)
    m = _metrics(server)
    assert m["selfeval_kv_blocks_used"] == 0 and m["selfeval_requests_running"] == 0
    assert m["selfeval_steps_total"] - steps_before < 200  # it stopped, it did not run its 400 steps


def test_a_policy_names_the_combined_scorer(llama_dir):
    """`"scorer": "combined"` is served with the app's fitted CombinedScorer (the policy's pick by
    it is tested in test_combined_scorer.py); a server without one answers 400 naming the field."""
    from engine.policies import CombinedScorer
    from engine.policies.combined import FEATURES

    engine = AsyncEngine(Engine(str(llama_dir), block_size=4, num_blocks=128))
    combined = CombinedScorer({"features": list(FEATURES), "mean": [0.0, -5.0], "std": [1.0, 1.0],
                               "weights": [0.5, 2.0]})
    body = {"model": "m", "prompt": "hi", "max_tokens": 4, "seed": 1,
            "policy": {"type": "best_of_n", "n": 3, "scorer": "combined"}}
    try:
        with TestClient(build_app(engine, "m", combined=combined)) as c:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["selfeval"]["score"] is not None
        with TestClient(build_app(engine, "m")) as c:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "policy.scorer"
    finally:
        engine.shutdown()


def test_the_app_mounts_inside_another_app(llama_dir):
    engine = AsyncEngine(Engine(str(llama_dir), block_size=4, num_blocks=128))
    outer = FastAPI()

    @outer.get("/")
    def home():
        return {"app": "outer"}

    outer.mount("/llm", build_app(engine, "m"))
    try:
        with TestClient(outer) as c:
            assert c.get("/").json() == {"app": "outer"}
            assert c.get("/llm/health").json() == {"status": "ok"}
            r = c.post("/llm/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
            lines = [json.loads(x[6:]) for x in c.post("/llm/v1/completions", json={
                "model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}).text.splitlines()
                if x.startswith("data: {")]
            assert lines and lines[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        engine.shutdown()


def test_over_the_queue_bound_is_503_with_a_retry(llama_dir, monkeypatch):
    engine = AsyncEngine(Engine(str(llama_dir), block_size=4, num_blocks=64))
    try:
        with TestClient(build_app(engine, "m", max_waiting=2)) as c:
            body = {"model": "m", "prompt": "a", "max_tokens": 2}
            assert c.post("/v1/completions", json=body).status_code == 200
            real = engine.stats
            monkeypatch.setattr(engine, "stats", lambda: {**real(), "requests_waiting": 2})
            r = c.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2})
            assert r.status_code == 503 and "waiting" in r.json()["error"]["message"]
            assert "x-should-retry" not in r.headers  # retrying later can help
    finally:
        engine.shutdown()


def test_the_engine_process_dying_makes_the_server_answer_503_and_nothing_is_left(llama_dir):
    proc, url = _launch(llama_dir)
    try:
        engine_pid = _engine_process(proc.pid)  # `selfeval serve` runs the engine in a process of its own
        body = {"model": "m", "prompt": "hi", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        os.kill(engine_pid, signal.SIGKILL)
        deadline = time.time() + 10
        while httpx.get(f"{url}/health", timeout=5).status_code != 503 and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, url = _launch(llama_dir)  # a clean stop stops the engine process too
    engine_pid = _engine_process(proc.pid)
    proc.terminate()
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while Path(f"/proc/{engine_pid}").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{engine_pid}").exists()
