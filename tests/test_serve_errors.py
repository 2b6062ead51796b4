"""Every client mistake gets OpenAI's error shape and status, mapped to the `openai` client's exception
classes; a fuzz set of malformed bodies never yields a 500 and leaves the server answering."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.model import GPT, GPTConfig  # noqa: E402
from chatforge.serve.app import ServeConfig, create_app  # noqa: E402
from chatforge.serve.server import ServerThread  # noqa: E402

CONTEXT = 64
MAX_BODY = 50_000
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny(make_tiny_gpt, small_tokenizer):
    return make_tiny_gpt(CONTEXT), small_tokenizer


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=4),
                     ServeConfig(model_name="tiny", web=False, max_body_bytes=MAX_BODY))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def shape(body: dict) -> dict:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def completion(client, **kw):
    return client.completions.create(**{"model": "tiny", "prompt": "Mira", "max_tokens": 2, **kw})


def chat(client, **kw):
    return client.chat.completions.create(**{"model": "tiny", "messages": USER, "max_tokens": 2, **kw})


BAD_REQUESTS = [  # (endpoint, arguments, param)
    (completion, dict(suffix="and then"), "suffix"),
    (completion, dict(temperature=-1), "temperature"),
    (completion, dict(top_p=0), "top_p"),
    (completion, dict(presence_penalty=3), "presence_penalty"),
    (completion, dict(frequency_penalty=-2.5), "frequency_penalty"),
    (completion, dict(logprobs=6), "logprobs"),
    (completion, dict(n=0), "n"),
    (completion, dict(n=100), "n"),
    (completion, dict(best_of=1, n=2), "best_of"),
    (completion, dict(best_of=3, n=1, stream=True), "best_of"),
    (completion, dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (completion, dict(stop=[""]), "stop"),
    (completion, dict(logit_bias={"word": 1}), "logit_bias"),
    (completion, dict(logit_bias={"5": 101}), "logit_bias"),
    (completion, dict(logit_bias={"100000": 1}), "logit_bias"),
    (completion, dict(prompt=[5, 100000]), "prompt"),
    (completion, dict(prompt=[]), "prompt"),
    (completion, dict(prompt=[[]]), "prompt"),
    (completion, dict(max_tokens=-1), "max_tokens"),
    (completion, dict(seed=2 ** 64), "seed"),
    (completion, dict(stream_options={"include_usage": True}), "stream_options"),
    (completion, dict(extra_body={"top_k": -1}), "top_k"),
    (completion, dict(extra_body={"min_p": 2.0}), "min_p"),
    (completion, dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (completion, dict(extra_body={"min_tokens": 5}), "min_tokens"),
    (completion, dict(extra_body={"num_beams": 2}, n=3), "n"),
    (completion, dict(extra_body={"num_beams": 2}, logprobs=1), "logprobs"),
    (completion, dict(extra_body={"num_beams": 1000}), "num_beams"),
    (completion, dict(extra_body={"stop_token_ids": [10 ** 6]}), "stop_token_ids"),
    (chat, dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat, dict(top_logprobs=2), "top_logprobs"),
    (chat, dict(max_tokens=0), "max_tokens"),
    (chat, dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (chat, dict(messages=[{"role": "user", "content": ""}]), "messages"),
    (chat, dict(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), "messages"),
    (chat, dict(messages=[]), "messages"),
    (chat, dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (chat, dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
     "tools[0].function.parameters"),
    (chat, dict(response_format={"type": "xml"}), "response_format.type"),
]


@pytest.mark.parametrize("call,kwargs,param", BAD_REQUESTS,
                         ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _) in enumerate(BAD_REQUESTS)])
def test_invalid_values_are_400_naming_the_parameter(client, call, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        call(client, **kwargs)
    error = shape(info.value.response.json())
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_context_length_exceeded_gives_the_token_counts(client, tiny):
    tok = tiny[1]
    prompt = "Mira walked her dog"
    n = len(tok.encode(prompt))
    with pytest.raises(openai.BadRequestError) as info:
        completion(client, prompt=prompt, max_tokens=CONTEXT)
    error = shape(info.value.response.json())
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert f"{CONTEXT} tokens" in error["message"] and f"{n} in the prompt" in error["message"]
    assert f"{n + CONTEXT} tokens" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=[{"role": "user", "content": "Mira walked her dog. " * 20}], max_tokens=None)
    error = shape(info.value.response.json())
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    # exactly the context is fine: scoring a prompt that fills it
    assert completion(client, prompt=list(range(7, 7 + CONTEXT)), max_tokens=0, echo=True).choices[0].text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        completion(client, model="gpt-17")
    error = shape(info.value.response.json())
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-17" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_unknown_route_and_method_are_in_the_same_shape(server):
    r = httpx.post(server.url + "/v1/engines/davinci/completions", json={})
    assert r.status_code == 404 and shape(r.json())["code"] == "unknown_url"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and shape(r.json())["code"] == "method_not_allowed"


def test_no_framework_pages_are_served_and_a_missing_record_keeps_its_own_message(tiny):
    """/docs, /redoc and /openapi.json would bypass the key and load Swagger UI from a CDN."""
    from fastapi.testclient import TestClient

    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=2), ServeConfig(model_name="tiny", db_url="sqlite://"))
    with TestClient(app) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = http.get(path)
            assert r.status_code == 404 and shape(r.json())["code"] == "unknown_url"
        r = http.get("/api/conversations/424242")
        assert r.status_code == 404
        error = shape(r.json())
        assert error["code"] == "not_found" and "424242" in error["message"]


def test_wrong_types_are_422_naming_the_field(client, server):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        completion(client, max_tokens="ten")
    error = shape(info.value.response.json())
    assert error["param"] == "max_tokens" and "integer" in error["message"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        chat(client, messages=[{"role": "user", "content": 5}])
    assert shape(info.value.response.json())["param"] == "messages[0].content"
    with pytest.raises(openai.UnprocessableEntityError) as info:
        completion(client, prompt=[1, "a"])
    error = shape(info.value.response.json())
    assert error["param"] == "prompt" and "list of token ids" in error["message"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        completion(client, logit_bias={"5": "high"})
    assert shape(info.value.response.json())["param"] == "logit_bias"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny"})
    assert r.status_code == 422
    error = shape(r.json())
    assert error["param"] == "messages" and error["code"] == "missing_required_parameter"


def test_oversized_body_is_413(client, server):
    with pytest.raises(openai.APIStatusError) as info:
        completion(client, prompt="x" * (2 * MAX_BODY))
    assert info.value.status_code == 413
    assert shape(info.value.response.json())["code"] == "request_too_large"
    # a body without Content-Length (chunked) is counted as it arrives
    chunks = (b'{"model": "tiny", "prompt": "' + b"y" * 10_000 if i == 0 else b"y" * 10_000 for i in range(8))
    r = httpx.post(server.url + "/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert completion(client).choices[0].finish_reason in ("stop", "length")


def test_api_key_is_required_on_the_api_but_not_on_health(tiny):
    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=2), ServeConfig(model_name="tiny", web=False, api_key="s3cret"))
    with ServerThread(app) as s:
        for key in ("wrong", "s3cre", "s3cret-and-more"):
            bad = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as info:
                bad.models.list()
            error = shape(info.value.response.json())
            assert error["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "a"})
        assert r.status_code == 401 and "Bearer" in shape(r.json())["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=1).choices


def _deep(n: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * n + b"]" * n + b"}"


FUZZ: list[tuple[bytes | dict | list, str]] = [  # (body, endpoint)
    (b"{", "completions"),
    (b"not json at all", "completions"),
    (b"\xff\xfe\x00garbage", "chat/completions"),
    (b"", "completions"),
    (b"null", "completions"),
    (b"[]", "chat/completions"),
    (b"123", "chat/completions"),
    (b'"a string"', "completions"),
    (_deep(20_000), "completions"),
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "completions"),
    (b'{"model": "tiny", "prompt": "a", "temperature": Infinity}', "completions"),
    (b'{"model": "tiny", "prompt": "a", "top_p": 1e400}', "completions"),
    ({"model": 5, "prompt": "a"}, "completions"),
    ({"model": "tiny"}, "completions"),
    ({"model": "tiny", "prompt": {"text": "a"}}, "completions"),
    ({"model": "tiny", "prompt": [1, "a"]}, "completions"),
    ({"model": "tiny", "prompt": [[1], ["a"]]}, "completions"),
    ({"model": "tiny", "prompt": [-1]}, "completions"),
    ({"model": "tiny", "prompt": [2 ** 70]}, "completions"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10 ** 30}, "completions"),
    ({"model": "tiny", "prompt": "a", "max_tokens": True}, "completions"),
    ({"model": "tiny", "prompt": "a", "n": 10 ** 12}, "completions"),
    ({"model": "tiny", "prompt": "a", "best_of": 10 ** 12}, "completions"),
    ({"model": "tiny", "prompt": "a", "logprobs": 10 ** 20}, "completions"),
    ({"model": "tiny", "prompt": "a", "top_k": 10 ** 30, "max_tokens": 1}, "completions"),
    ({"model": "tiny", "prompt": "a", "min_tokens": 10 ** 30}, "completions"),
    ({"model": "tiny", "prompt": "a", "no_repeat_ngram_size": 10 ** 30, "num_beams": 2, "max_tokens": 2},
     "completions"),
    ({"model": "tiny", "prompt": "a", "seed": 10 ** 40, "max_tokens": 1}, "completions"),
    ({"model": "tiny", "prompt": "a", "seed": 2 ** 63 - 1, "max_tokens": 1, "temperature": 0.5}, "completions"),
    ({"model": "tiny", "prompt": "a", "seed": -5, "max_tokens": 1}, "completions"),
    ({"model": "tiny", "prompt": "a", "stop": 5}, "completions"),
    ({"model": "tiny", "prompt": "a", "stop": ["x"] * 1000}, "completions"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"1": "high"}}, "completions"),
    ({"model": "tiny", "prompt": "a", "logit_bias": [1, 2]}, "completions"),
    ({"model": "tiny", "prompt": ["a"] * 10_000}, "completions"),
    ({"model": "tiny", "prompt": "a", "stream": "yes"}, "completions"),
    ({"model": "tiny", "prompt": "a", "stream_options": "usage"}, "completions"),
    ({"model": "tiny", "messages": "hello"}, "chat/completions"),
    ({"model": "tiny", "messages": [{"content": "no role"}]}, "chat/completions"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "chat/completions"),
    ({"model": "tiny", "messages": [None]}, "chat/completions"),
    ({"model": "tiny", "messages": [{"role": "assistant", "tool_calls": "x"}]}, "chat/completions"),
    ({"model": "tiny", "messages": USER, "top_logprobs": 10 ** 9, "logprobs": True}, "chat/completions"),
    ({"model": "tiny", "messages": USER, "max_completion_tokens": -3}, "chat/completions"),
    ({"model": "tiny", "messages": USER, "n": -1}, "chat/completions"),
]


def test_fuzz_malformed_bodies_get_4xx_in_shape_and_the_server_still_answers(server, client):
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, endpoint in FUZZ:
            if isinstance(body, bytes):
                r = http.post(f"/v1/{endpoint}", content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(f"/v1/{endpoint}", content=json.dumps(body), headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            if r.status_code != 200:
                assert 400 <= r.status_code < 500, (body[:200], r.status_code, r.text[:300])
                shape(r.json())
        r = http.post("/v1/completions", content=b'{"model":"tiny","prompt":"a"}',
                      headers={"Content-Type": "text/plain"})
        assert r.status_code in (400, 422) and shape(r.json())
    assert statuses.count(200) <= 4  # huge seeds and top_k, a capped n-gram size: valid requests
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in metrics
    assert completion(client).choices[0].finish_reason in ("stop", "length")
    assert chat(client).choices[0].message.role == "assistant"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


class FailingEngine(Engine):
    """The real engine, made to fail once mid-generation (as an out-of-memory would)."""

    fail_at_step: int | None = None

    def step(self):
        if self.fail_at_step is not None:
            self.fail_at_step -= 1
            if self.fail_at_step < 0:
                self.fail_at_step = None
                raise RuntimeError("simulated failure")
        return super().step()


def test_an_error_after_the_stream_began_is_an_error_event_and_the_server_recovers(tiny):
    model, tok = tiny
    engine = FailingEngine(model, tok, max_batch_size=2)
    app = create_app(engine, ServeConfig(model_name="tiny", web=False))
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        engine.fail_at_step = 3
        stream = c.chat.completions.create(model="tiny", messages=USER, max_tokens=20, stream=True,
                                           extra_body={"ignore_eos": True})
        received = []
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                received.append(chunk)
        assert received and received[0].choices[0].delta.role == "assistant"
        assert info.value.body["type"] == "server_error"
        # raw: the error is a `data: {"error": ...}` event
        engine.fail_at_step = 2
        with httpx.stream("POST", s.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 20,
                                                                   "stream": True, "ignore_eos": True}) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200
        errors = [json.loads(e) for e in events if e.startswith("{") and "error" in json.loads(e)]
        assert len(errors) == 1 and shape(errors[0])["type"] == "server_error"
        # a non-streamed request that fails is a 500 in the same shape
        engine.fail_at_step = 1
        with pytest.raises(openai.InternalServerError) as info:
            c.completions.create(model="tiny", prompt="a", max_tokens=20, extra_body={"ignore_eos": True})
        shape(info.value.response.json())
        # and the engine serves on
        r = c.completions.create(model="tiny", prompt="a", max_tokens=5, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and engine.num_running == 0


def test_text_the_tokenizer_maps_past_the_models_rows_is_a_400_not_a_crash(tiny):
    # a GPT-2 directory's tokenizer carries chat tokens the model has no rows for; any prompt whose
    # ids fall past the model's vocabulary is refused up front, on both endpoints, and the server lives on
    _, tok = tiny
    torch.manual_seed(0)
    small = GPT(GPTConfig(vocab_size=8, context_length=CONTEXT, n_layer=1, n_head=2, n_embd=16)).eval()
    app = create_app(Engine(small, tok, max_batch_size=2), ServeConfig(model_name="tiny", web=False))
    with ServerThread(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        for call, param in ((chat, "messages"), (completion, "prompt")):
            with pytest.raises(openai.BadRequestError) as info:
                call(client)
            error = shape(info.value.response.json())
            assert error["param"] == param and "no rows" in error["message"], error
        assert httpx.get(s.url + "/health").status_code == 200
