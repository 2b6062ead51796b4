"""Serving with a watermark and `POST /v1/detect` (chatforge/serve/detect.py).

A tiny random model (1 layer, 300-token vocabulary, 256-token context) serves. Its answers sample
at temperature 1 with the special tokens and the non-ASCII byte tokens banned (`TEXT_ONLY`), so an
answer is plain text whose tokens survive the round trip through text that detection makes: what a
real model's answers are. A watermark's delta of 2 makes about 73% of such tokens green instead of
25%, so a 120-token answer scores z ~ 12 and the default threshold of 4 is met by far.
"""

from __future__ import annotations

import contextlib
import json
import logging

import httpx
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (the server's dependencies)")

from fastapi.testclient import TestClient  # noqa: E402

from chatforge.errors import ConfigError  # noqa: E402
from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.generate.watermark import key_from_text  # noqa: E402
from chatforge.serve.app import ServeConfig, create_app  # noqa: E402
from chatforge.serve.detect import server_watermark  # noqa: E402
from chatforge.serve.server import ServerThread, startup_line  # noqa: E402

SERVER_KEY = "violet-otter-7731-server-key"
CLIENT_KEY = "a client's own key"
PROMPT = "The capital of Veloria"
MAX_PROMPTS = 4
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def tiny(make_tiny_gpt, small_tokenizer):
    return make_tiny_gpt(256), small_tokenizer


@pytest.fixture(scope="module")
def text_only(tiny) -> dict[str, float]:
    """logit_bias banning special tokens and tokens that are not printable ASCII (or a newline)."""
    tok = tiny[1]
    specials = set(tok.special_ids.values())

    def plain(i: int) -> bool:
        data = tok.token_bytes(i)
        return i not in specials and data.isascii() and all(32 <= b < 127 or b == 10 for b in data)

    return {str(i): -100 for i in range(tok.vocab_size) if not plain(i)}


def make_app(tiny, **config):
    model, tok = tiny
    return create_app(Engine(model, tok, max_batch_size=4),
                      ServeConfig(model_name="tiny", web=False, max_prompts=MAX_PROMPTS, max_body_bytes=MAX_BODY,
                                  **config))


@pytest.fixture(scope="module")
def keyed(tiny):
    """A server started with --watermark-key."""
    with TestClient(make_app(tiny, watermark_key=SERVER_KEY)) as http:
        yield http


@pytest.fixture(scope="module")
def plain(tiny):
    """A server without a watermark key."""
    with TestClient(make_app(tiny)) as http:
        yield http


def complete(http, text_only, **body) -> list[str]:
    """The texts of a /v1/completions request's choices (temperature 1, seeded)."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 120, "seed": 1, "logit_bias": text_only, **body}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def detect(http, **body) -> dict:
    r = http.post("/v1/detect", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def verdicts(response: dict) -> list[str]:
    return [item["verdict"] for item in response["data"]]


def error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- answers are watermarked, and /v1/detect finds it ------------------------------------------------


def test_an_answer_of_a_server_with_a_key_is_detected_and_the_same_request_without_the_key_is_not(
        keyed, plain, text_only):
    (marked,) = complete(keyed, text_only)
    (unmarked,) = complete(plain, text_only)
    assert marked != unmarked  # the same request and seed; only the watermark differs
    found = detect(keyed, input=[marked, unmarked])  # the server's own key by default
    assert verdicts(found) == ["watermarked", "not watermarked"]
    first, second = found["data"]
    assert first["index"] == 0 and first["z"] > 8 and first["p_value"] < 1e-12 and first["green_fraction"] > 0.5
    assert first["tokens_scored"] >= 100 and first["z_threshold"] == 4.0
    assert second["index"] == 1 and second["z"] < 4
    assert found["method"] == "watermark" and found["object"] == "list"
    assert found["watermark"] == {"gamma": 0.25, "delta": 2.0, "seeding_scheme": "lefthash", "context_width": 1}
    # a server without a key checks a text against the key it is given
    assert verdicts(detect(plain, input=[marked, unmarked], key=SERVER_KEY)) == ["watermarked", "not watermarked"]
    assert verdicts(detect(plain, input=marked, key="another key")) == ["not watermarked"]


def test_chat_answers_streamed_or_not_and_every_one_of_n_are_watermarked(keyed, text_only):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Where is Kesh?"}], "max_tokens": 120,
            "seed": 2, "logit_bias": text_only}
    r = keyed.post("/v1/chat/completions", json={**body, "n": 2})
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    streamed = ""
    with keyed.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "seed": 3}) as events:
        for line in events.iter_lines():
            if line.startswith("data: {"):
                streamed += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
    assert verdicts(detect(keyed, input=[*texts, streamed])) == ["watermarked"] * 3


def test_every_generation_path_carries_the_servers_watermark(make_tiny_gpt, small_tokenizer, monkeypatch):
    """One place (handlers.build_params) sets it; the engine keeps a request's params for all its rows
    and for the turns after built-in tool calls (this server offers them: their specs need a long context)."""
    app = make_app((make_tiny_gpt(1024), small_tokenizer), watermark_key=SERVER_KEY, builtin_tools=True)
    state, seen = app.state.chatforge, []
    submit = state.runner.submit

    def spy(subs, loop=None):
        seen.extend(subs)
        return submit(subs, loop)

    monkeypatch.setattr(state.runner, "submit", spy)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "What is 12*7?"}], "max_tokens": 3}
    with TestClient(app) as http:
        for path, body in [("/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2, "n": 2}),
                           ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "best_of": 3}),
                           ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", {**chat, "n": 3}),
                           ("/v1/chat/completions", {**chat, "stream": True}),
                           ("/v1/chat/completions", {**chat, "temperature": 0})]:
            assert http.post(path, json=body).status_code == 200
    assert len(seen) == 7
    assert all(sub.params.watermark is state.watermark for sub in seen)
    assert all(sub.tool_use is not None for sub in seen[4:])  # chat answers may call the built-in tools


def test_a_request_brings_its_own_watermark_when_the_server_has_no_key(plain, text_only):
    (own,) = complete(plain, text_only, watermark={"key": CLIENT_KEY})
    assert verdicts(detect(plain, input=own, key=CLIENT_KEY)) == ["watermarked"]
    assert verdicts(detect(plain, input=own, key="not the client's key")) == ["not watermarked"]
    (tuned,) = complete(plain, text_only, watermark={"key": 15485863, "gamma": 0.5, "seeding_scheme": "selfhash",
                                                     "context_width": 2})
    found = detect(plain, input=tuned, key=15485863, gamma=0.5, seeding_scheme="selfhash", context_width=2)
    assert verdicts(found) == ["watermarked"]
    assert found["watermark"] == {"gamma": 0.5, "delta": 2.0, "seeding_scheme": "selfhash", "context_width": 2}
    assert verdicts(detect(plain, input=tuned, key=15485863)) == ["not watermarked"]  # other settings


def test_a_server_with_a_key_refuses_a_requests_own_watermark(keyed):
    """The operator decides: a client can neither switch the watermark off nor change its key or settings."""
    for body in [{"prompt": "a", "watermark": {"key": CLIENT_KEY}},
                 {"messages": [{"role": "user", "content": "hi"}], "watermark": {"key": 7, "delta": 0.0},
                  "stream": True}]:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        e = error(keyed.post(path, json={"model": "tiny", "max_tokens": 2, **body}))
        assert e["param"] == "watermark" and "operator" in e["message"] and CLIENT_KEY not in e["message"]


def test_windowed_detection_finds_a_watermarked_passage_pasted_inside_other_text(plain, text_only):
    (passage,) = complete(plain, text_only, max_tokens=64, watermark={"key": CLIENT_KEY})
    before, after = complete(plain, text_only, prompt=["Mira walked", "12 plus 12"], max_tokens=200)
    found = detect(plain, input=[before + passage + after, before + after], key=CLIENT_KEY, windowed=True)
    mixed, human = (item["window"] for item in found["data"])
    assert mixed["verdict"] == "watermarked" and mixed["corrected_p_value"] < 1e-4
    assert mixed["text"][8:-8] in passage  # the window is the passage (give or take a token at its edges)
    assert human["verdict"] == "not watermarked"


def test_text_too_short_to_score_gets_an_answer_not_a_verdict(keyed):
    found = detect(keyed, input=["", "Kesh"])
    assert verdicts(found) == ["too short", "too short"]
    assert found["data"][0]["z"] is None and "at least 16" in found["data"][0]["message"]


def test_the_model_card_says_whether_answers_are_watermarked(keyed, plain):
    assert keyed.get("/v1/models").json()["data"][0]["watermark"]["gamma"] == 0.25
    assert plain.get("/v1/models").json()["data"][0]["watermark"] is None


# ---- mistakes are named ------------------------------------------------------------------------------


@pytest.mark.parametrize("body,status,param", [
    ({"input": []}, 400, "input"),
    ({"input": ["a"] * (MAX_PROMPTS + 1)}, 400, "input"),
    ({"input": 5}, 422, "input"),
    ({}, 422, "input"),
    ({"input": "a", "method": "perplexity"}, 400, "method"),
    ({"input": "a", "gamma": 1.5}, 400, "gamma"),
    ({"input": "a", "gamma": 0.001}, 400, "gamma"),  # no token of 300 would be green
    ({"input": "a", "seeding_scheme": "simple_1"}, 400, "seeding_scheme"),
    ({"input": "a", "context_width": 0}, 400, "context_width"),
    ({"input": "a", "key": "  "}, 400, "key"),
    ({"input": "a", "key": 0}, 400, "key"),
    ({"input": "a", "key": 2**63}, 400, "key"),
    ({"input": "a", "key": [SERVER_KEY]}, 422, "key"),
    ({"input": "a", "z_threshold": "4"}, 422, "z_threshold"),
    ({"input": "a", "windowed": "yes"}, 422, "windowed"),
])
def test_bad_detect_fields_are_named(keyed, body, status, param):
    assert error(keyed.post("/v1/detect", json=body), status)["param"] == param


def test_detect_needs_a_key_on_a_server_without_one(plain):
    e = error(plain.post("/v1/detect", json={"input": "some text"}))
    assert e["param"] == "key" and e["code"] == "no_watermark_key" and "--watermark-key" in e["message"]


@pytest.mark.parametrize("watermark,extra,status,param", [
    ({"key": "k", "gamma": 2.0}, {}, 400, "watermark.gamma"),
    ({"key": "k", "delta": -1.0}, {}, 400, "watermark.delta"),
    ({"key": "k", "seeding_scheme": "x"}, {}, 400, "watermark.seeding_scheme"),
    ({"key": ""}, {}, 400, "watermark.key"),
    ({"gamma": 0.5}, {}, 422, "watermark.key"),
    ({"key": "k", "gama": 0.5}, {}, 422, "watermark.gama"),  # a typo is not silently ignored
    ({"key": "k"}, {"num_beams": 2}, 400, "num_beams"),  # beam search cannot be watermarked
])
def test_bad_watermark_fields_are_named(plain, watermark, extra, status, param):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "watermark": watermark, **extra}
    assert error(plain.post("/v1/completions", json=body), status)["param"] == param


def test_detect_keeps_the_body_limit_and_the_api_key(tiny):
    app = make_app(tiny, watermark_key=SERVER_KEY, api_key="api-secret")
    with TestClient(app) as http:
        auth = {"Authorization": "Bearer api-secret"}
        assert error(http.post("/v1/detect", json={"input": "a"}), 401)["code"] == "invalid_api_key"
        big = http.post("/v1/detect", json={"input": "x" * MAX_BODY}, headers=auth)
        assert error(big, 413)["code"] == "request_too_large"
        assert http.post("/v1/detect", json={"input": "a"}, headers=auth).status_code == 200


def test_serve_takes_the_key_from_a_flag_the_environment_or_a_config_file(tmp_path, monkeypatch, capsys):
    import chatforge.serve.server as server
    from chatforge.cli import main

    seen = []
    monkeypatch.setattr(server, "serve_checkpoint", seen.append)  # the config it would serve; nothing binds

    def serve(*args) -> None:
        with contextlib.suppress(SystemExit):
            main(["serve", "--checkpoint", "c", *map(str, args)])

    serve("--watermark-key", SERVER_KEY, "--watermark-gamma", "0.5", "--watermark-seeding-scheme", "selfhash",
          "--watermark-context-width", "3", "--watermark-delta", "1.5")
    assert seen[-1].watermark_key == SERVER_KEY and SERVER_KEY not in repr(seen[-1])
    assert (seen[-1].watermark_gamma, seen[-1].watermark_delta) == (0.5, 1.5)
    assert (seen[-1].watermark_seeding_scheme, seen[-1].watermark_context_width) == ("selfhash", 3)
    monkeypatch.setenv("CHATFORGE_WATERMARK_KEY", "from the environment")
    serve()
    assert seen[-1].watermark_key == "from the environment"
    monkeypatch.delenv("CHATFORGE_WATERMARK_KEY")
    (tmp_path / "serve.yaml").write_text("watermark_key: 15485863\n")  # an integer key, as transformers takes it
    serve("--config", tmp_path / "serve.yaml")
    assert seen[-1].watermark_key == "15485863" and server_watermark(seen[-1], 300)[0].key == 15485863
    serve("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--watermark-key TEXT Watermark every answer" in help_text and "SECRET" in help_text
    assert "CHATFORGE_WATERMARK_KEY" in help_text


def test_bad_watermark_flags_fail_at_startup_without_showing_the_key():
    with pytest.raises(ConfigError, match="--watermark-gamma"):
        server_watermark(ServeConfig(watermark_key=SERVER_KEY, watermark_gamma=1.0), 300)
    with pytest.raises(ConfigError, match="--watermark-seeding-scheme"):
        server_watermark(ServeConfig(watermark_seeding_scheme="simple_1"), 300)
    huge = "9" * 25
    with pytest.raises(ConfigError, match="--watermark-key") as info:
        server_watermark(ServeConfig(watermark_key=huge), 300)
    assert huge not in str(info.value)
    assert server_watermark(ServeConfig(), 300)[0] is None


# ---- the key never shows -----------------------------------------------------------------------------


@contextlib.contextmanager
def captured_logs():
    """Every log record of the server (chatforge, uvicorn and its access log, which does not propagate)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.access", "chatforge")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("chatforge").setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def failing_step(engine):
    """engine.step failing once: the runner logs the error with its traceback and fails what was running."""
    real = engine.step

    def step():
        engine.step = real
        raise RuntimeError("the accelerator fell over")

    return step


def leaky_requests(url: str, text_only: dict) -> list[httpx.Response]:
    """Answering, streaming, failing and detecting requests; some of them send the key themselves."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "logit_bias": text_only}
    calls = [("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "logit_bias": text_only}),
             ("/v1/chat/completions", {**chat, "stream": True, "n": 2}),
             ("/v1/chat/completions", {**chat, "watermark": {"key": SERVER_KEY}}),  # 400: the server has a key
             ("/v1/chat/completions", {**chat, "watermark": {"key": [SERVER_KEY]}}),  # 422
             ("/v1/chat/completions", {**chat, "watermark": {"key": SERVER_KEY, "gama": SERVER_KEY}}),  # 422
             ("/v1/detect", {"input": ["Mira walked her dog. " * 8, ""], "windowed": True}),
             ("/v1/detect", {"input": "some text", "key": SERVER_KEY, "gamma": 7}),  # 400
             ("/v1/detect", {"input": "some text", "key": {"secret": SERVER_KEY}}),  # 422
             ("/v1/detect", {"input": "x", "method": "perplexity"})]  # 400
    with httpx.Client(base_url=url, timeout=30) as http:
        out = [http.post(path, json=body) for path, body in calls]
        out.append(http.post("/v1/detect", content='{"input": "x", "key": "' + SERVER_KEY + '"',  # bad JSON
                              headers={"Content-Type": "application/json"}))
        out += [http.get("/v1/models"), http.get("/health"), http.get("/nowhere")]
        out.append(http.get("/metrics"))
    return out


def test_the_key_never_appears_in_responses_logs_or_metrics(tiny, text_only):
    secrets = [SERVER_KEY, str(key_from_text(SERVER_KEY))]
    config = ServeConfig(model_name="tiny", web=False, watermark_key=SERVER_KEY)
    app = create_app(Engine(*tiny, max_batch_size=4), config)
    server = ServerThread(app, log_level="debug")
    with captured_logs() as logs, server:
        responses = leaky_requests(server.url, text_only)
        engine = app.state.chatforge.engine
        engine.step = failing_step(engine)
        with httpx.Client(base_url=server.url, timeout=30) as http:  # fails in the engine's thread
            responses.append(http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 5}))
    assert [r.status_code for r in responses] == [200, 200, 400, 422, 422, 200, 400, 422, 400, 400, 200, 200, 404,
                                                  200, 500]
    assert any("POST /v1/detect" in line for line in logs)  # the access log was captured
    assert any("engine step failed" in line and "Traceback" in line for line in logs)  # so was the error log
    shown = [r.text for r in responses] + [json.dumps(dict(r.headers)) for r in responses] + logs
    shown += [startup_line(config), repr(config), repr(app.state.chatforge), repr(app.state.chatforge.watermark)]
    for secret in secrets:
        assert not [text for text in shown if secret in text], "the watermark key leaked"
    assert "every answer is watermarked (gamma 0.25, delta 2, lefthash" in startup_line(config)
