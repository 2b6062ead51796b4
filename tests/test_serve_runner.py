"""Continuous batching behind the HTTP API: shared decode steps, cancellation when a client goes away,
the bounded queue (429), and graceful shutdown (503 for new requests while running ones finish).

The engine is the real one, slowed down (a sleep before each step) so that requests overlap.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402
from chatforge.model import GPT, GPTConfig  # noqa: E402
from chatforge.serve.app import ServeConfig, create_app  # noqa: E402
from chatforge.serve.runner import Cancelled, EngineRunner, Finished, Generated, Started, SubRequest  # noqa: E402
from chatforge.serve.server import ServerThread  # noqa: E402

STEP_S = 0.02
LONG = {"ignore_eos": True}  # run to max_tokens


class SlowEngine(Engine):
    """The real engine with a pause before each step, so requests are still running when a test acts."""

    def step(self):
        time.sleep(STEP_S)
        return super().step()


@pytest.fixture(scope="module")
def tiny(small_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=128, n_layer=1, n_head=2, n_embd=16)
    return GPT(config).eval(), small_tokenizer


def start(tiny, **config):
    model, tok = tiny
    slots = config.pop("max_batch_size", 2)
    app = create_app(SlowEngine(model, tok, max_batch_size=slots), ServeConfig(model_name="tiny", web=False, **config))
    return ServerThread(app).start(), app.state.chatforge.runner


def wait_for(condition, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def server(tiny):
    s, runner = start(tiny, max_batch_size=2, max_queue=1)
    yield s, runner
    s.stop()


def test_the_runner_posts_typed_messages_per_step(tiny):
    model, tok = tiny
    runner = EngineRunner(SlowEngine(model, tok, max_batch_size=2))
    prompt = tok.encode("Mira walked")

    async def collect(max_tokens: int, cancel: bool) -> list:
        job = runner.submit([SubRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **LONG))])
        got = await job.get()
        if cancel:
            runner.cancel(job)
        while not isinstance(got[-1], (Finished, Cancelled)):
            got += await job.get()
        return got

    try:
        done = asyncio.run(collect(3, cancel=False))
        cancelled = asyncio.run(collect(100, cancel=True))
    finally:
        runner.stop()
    assert isinstance(done[0], Started) and done[0].sub == 0  # prefilled: holds a slot
    assert [len(m.event.token_ids) for m in done if isinstance(m, Generated)] == [1, 1, 1]
    assert isinstance(done[-1], Finished) and done[-1].completion.completion_tokens == 3
    assert isinstance(cancelled[-1], Cancelled) and 1 <= cancelled[-1].completion_tokens < 100


def test_concurrent_requests_share_decode_steps(server):
    s, runner = server
    c = client(s)
    kw = dict(model="tiny", max_tokens=15, temperature=0, extra_body=LONG)
    alone = {p: c.completions.create(prompt=p, **kw).choices[0].text for p in ("Mira", "The dog")}
    before = runner.steps
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, c.completions.create(prompt=p, **kw)
                                                                          .choices[0].text)) for p in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone  # batched with another request, each answer is what it is alone
    assert runner.steps - before < 2 * 15  # one after the other would take 30 steps


def test_a_client_that_disconnects_frees_its_slot(server):
    s, runner = server
    steps = runner.steps
    body = {"model": "tiny", "prompt": "Mira", "max_tokens": 100, "stream": True, **LONG}
    with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: runner.engine.num_running == 1, what="the stream to run")
    # the connection is closed: the sequence is cancelled long before its 100 tokens
    wait_for(lambda: runner.num_active == 0 and runner.engine.num_running == 0, what="the slot to be freed")
    assert runner.steps - steps < 60
    assert runner.engine.requests == {}

    steps = runner.steps  # a non-streamed request whose client gives up (here: a read timeout)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    wait_for(lambda: runner.num_active == 0 and runner.engine.num_running == 0, what="the slot to be freed")
    assert runner.steps - steps < 60
    c = client(s)
    assert c.completions.create(model="tiny", prompt="a", max_tokens=3, extra_body=LONG).usage.completion_tokens == 3


def test_a_full_queue_answers_429(server):
    s, runner = server
    c = client(s)
    body = {"model": "tiny", "prompt": "Mira", "max_tokens": 100, "n": 2, "stream": True, **LONG}
    with httpx.stream("POST", s.url + "/v1/completions", json=body) as running:  # takes both slots
        lines = running.iter_lines()  # (kept: a dropped iterator closes the connection)
        next(lines)
        wait_for(lambda: runner.engine.num_running == 2, what="both slots in use")
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.setdefault(
            "r", c.completions.create(model="tiny", prompt="The", max_tokens=2, extra_body=LONG)))
        waiter.start()
        wait_for(lambda: runner.num_queued == 1, what="a request in the queue")
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model="tiny", prompt="The", max_tokens=2)
        error = info.value.response.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        assert info.value.response.headers["retry-after"] == "1"
        metrics = httpx.get(s.url + "/metrics").text
        assert "chatforge_queue_length 1" in metrics and "chatforge_running_sequences 2" in metrics
    waiter.join(10)  # the stream went away: its slots went to the queued request
    assert queued["r"].usage.completion_tokens == 2
    assert 'chatforge_requests_total{endpoint="/v1/completions",status="429"} 1' in httpx.get(s.url + "/metrics").text


def test_shutdown_refuses_new_requests_and_lets_running_ones_finish(tiny):
    s, runner = start(tiny, max_batch_size=4)
    try:
        c = client(s)
        first = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=25,
                                          stream=True, extra_body=LONG)
        chunks = [next(first)]
        wait_for(lambda: runner.engine.num_running == 1, what="the stream to run")
        runner.begin_shutdown()  # what SIGTERM does first
        with pytest.raises(openai.InternalServerError) as info:
            c.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert info.value.status_code == 503 and info.value.response.json()["error"]["code"] == "shutting_down"
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        chunks += list(first)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(1 for ch in chunks if ch.choices[0].delta.content is not None) >= 1

        # the whole SIGTERM path: a stream that is running when the signal comes still ends normally
        runner.draining = False
        body = {"model": "tiny", "prompt": "Mira", "max_tokens": 30, "stream": True, **LONG}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            events = [next(lines)]
            s.shutdown()
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"
        s.thread.join(10)
        assert not s.thread.is_alive()  # the server exited after the stream finished
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
    finally:
        s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_serve_command_answers_and_exits_on_sigterm(tmp_path, tiny):
    """`chatforge serve` as a user runs it, with an API key and a --moderation config file."""
    from chatforge.checkpoint import save_checkpoint
    from chatforge.serve.moderation import REFUSAL

    model, tok = tiny
    save_checkpoint(tmp_path / "chat" / "checkpoint", model, tok)
    moderation = tmp_path / "moderation.yaml"
    moderation.write_text("words: [forbidden]\npatterns:\n  secret_plan: '\\bsecret\\s+plan\\b'\n")
    port = _free_port()
    env = {**os.environ, "CHATFORGE_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", "--checkpoint", str(tmp_path / "chat"),
                             "--port", str(port), "--no-web", "--log-level", "warning",
                             "--moderation", str(moderation)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["chat"]
        r = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")  # not flagged: answered normally
        for text in ("Tell me something FORBIDDEN.", "What is the secret  plan?"):  # a word, then a pattern
            flagged = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": text}],
                                                max_tokens=3)
            assert flagged.choices[0].finish_reason == "content_filter", text
            assert flagged.choices[0].message.content == REFUSAL and flagged.usage.completion_tokens == 0
        assert httpx.get(url + "/v1/models").status_code == 401
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("name", "text", "detail"), [
    ("moderation.yaml", "words: [forbidden]\nblocked: [x]\n", "unknown key(s) ['blocked']"),
    ("moderation.yaml", "words: [forbidden\n", "not valid YAML"),
    ("moderation.json", '{"words": ["forbidden",', "not valid JSON"),
    ("moderation.json", '{"patterns": {"bad": "(unclosed"}}', "patterns.bad: invalid regular expression"),
    ("missing.yaml", None, "does not exist"),
])
def test_serve_with_a_bad_moderation_file_is_a_one_line_error_naming_the_file(tmp_path, tiny, capsys, monkeypatch,
                                                                              name, text, detail):
    from chatforge.checkpoint import save_checkpoint
    from chatforge.cli import main
    from chatforge.serve.server import GracefulServer

    model, tok = tiny
    save_checkpoint(tmp_path / "chat" / "checkpoint", model, tok)
    path = tmp_path / name
    if text is not None:
        path.write_text(text)

    def no_server(self, *args, **kwargs):
        raise AssertionError("the server started despite a bad moderation file")

    monkeypatch.setattr(GracefulServer, "run", no_server)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--checkpoint", str(tmp_path / "chat"), "--port", str(_free_port()), "--no-web",
              "--moderation", str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and "\n" not in err and detail in err
