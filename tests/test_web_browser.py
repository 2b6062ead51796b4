"""The web chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright; no downloads).

Most tests serve the page (`attach_web`) beside a fake `/v1/chat/completions` whose streamed answers
the test controls, so what the page shows and sends can be checked exactly; two run against the real
OpenAI-compatible server with a tiny random checkpoint (one chats past the model's context). Everything
skips, with the reason, when Chromium, Playwright or the server's dependencies are missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import socket
import threading
import time

import pytest
import torch

from chatforge.data.chat_readers import read_preferences
from chatforge.data.examples import GENERIC_EXAMPLES

fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed (the server's dependencies)")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (the server's dependencies)")
pytest.importorskip("sqlalchemy", reason="sqlalchemy is not installed (the server's dependencies)")

from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from chatforge.serve.feedback import feedback, preference_records  # noqa: E402
from chatforge.serve.web import attach_web  # noqa: E402

CHROMIUM = (os.environ.get("CHATFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
            or shutil.which("google-chrome"))
XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_ANSWER = f"{XSS_IMG} and {XSS_SCRIPT} & <b>bold</b>"
SLOW_TICKS = 400  # the slow answer's length; Stop must end it long before
FAKE_CONTEXT = 128  # the context length the fake model reports
FAKE_TURNS = 3  # messages after the system prompt the fake's context holds: user, assistant, user
DROPPED_HEADER = "X-Chatforge-Dropped-Messages"


# ---------------------------------------------------------------------------------------------
# A live server in a background thread, and a browser


class LiveServer:
    """Serve `app` with uvicorn on a free local port in a daemon thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright; its browsers are "
                                          "not needed: the system chromium is used)")
    if not CHROMIUM:
        pytest.skip("no chromium executable found (apt-get install -y chromium, or set CHATFORGE_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        except Exception as e:  # a chromium Playwright cannot drive
            pytest.skip(f"cannot start {CHROMIUM} with Playwright: {str(e).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture
def expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=10_000)
    return expect


# ---------------------------------------------------------------------------------------------
# The fake model endpoint


def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if role else {} if content is None else {"content": content}
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def fake_app(db_url: str, api_key: str | None = None):
    """The web routes plus a fake OpenAI endpoint. Answers, by the last user message:
    ``xss…`` -> `XSS_ANSWER`; ``slow…`` -> "tick " every 25 ms (`SLOW_TICKS` of them); ``fail…`` -> "Partial"
    then an error event in the stream; ``flaky…`` -> the same the first time, then as anything else;
    ``refuse…`` -> a 400 error; ``tool…`` -> an answer that ran two rounds of built-in tools (`tool_events`);
    anything else -> "Answer N to: MESSAGE", N counting the answers made.

    Like the real server, its context holds only so much (`FAKE_TURNS` messages after the system prompt):
    with ``"truncation": "auto"`` it leaves out the oldest whole turns and says how many in the
    `DROPPED_HEADER` header; without, a longer chat is a 400."""
    app = fastapi.FastAPI()
    attach_web(app, db_url, api_key=api_key)
    app.state.requests = []  # bodies of /v1/chat/completions
    app.state.seen = []  # (path, Authorization header) of every request
    app.state.slow = {"sent": 0, "closed": False}
    counter = itertools.count(1)
    flaked: set[str] = set()

    @app.middleware("http")
    async def record(request, call_next):
        app.state.seen.append((request.url.path, request.headers.get("authorization")))
        return await call_next(request)

    def denied(request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: fastapi.Request):
        return denied(request) or {"object": "list", "data": [{"id": "fake-model", "object": "model",
                                                              "context_length": FAKE_CONTEXT}]}

    @app.post("/v1/chat/completions")
    async def completions(request: fastapi.Request):
        if (response := denied(request)) is not None:
            return response
        body = await request.json()
        app.state.requests.append(body)
        last = body["messages"][-1]["content"]
        dropped = len(body["messages"]) - (body["messages"][0]["role"] == "system") - FAKE_TURNS
        if dropped > 0 and body.get("truncation") != "auto":
            return too_long()
        headers = {DROPPED_HEADER: str(max(dropped, 0))}
        if last.startswith("slow"):
            return StreamingResponse(slow_events(app.state.slow), media_type="text/event-stream")
        if last.startswith("fail") or (last.startswith("flaky") and last not in flaked):
            flaked.add(last)
            return StreamingResponse(failing_events(), media_type="text/event-stream")
        if last.startswith("refuse"):
            return too_long()
        if last.startswith("tool"):
            return StreamingResponse(tool_events(next(counter)), media_type="text/event-stream", headers=headers)
        if last.startswith("xss"):
            pieces, newline = [XSS_IMG, " and ", XSS_SCRIPT, " & <b>bold</b>"], "\r\n"
        else:
            text = f"Answer {next(counter)} to: {last}"
            pieces, newline = [text[i:i + 4] for i in range(0, len(text), 4)], "\n"
        return StreamingResponse(events(pieces, newline), media_type="text/event-stream", headers=headers)

    return app


def too_long() -> JSONResponse:
    return JSONResponse({"error": {"message": "This model's maximum context length is 64 tokens",
                                   "type": "invalid_request_error", "param": "messages",
                                   "code": "context_length_exceeded"}}, status_code=400)


async def events(pieces: list[str], newline: str):
    frames = [chunk(role=True), *(chunk(p) for p in pieces), chunk(finish="stop")]
    for frame in frames:
        data = f"data: {json.dumps(frame)}{newline}{newline}".encode()
        half = len(data) // 2
        yield data[:half]  # an event split over two network writes: the page must buffer
        await asyncio.sleep(0.005)
        yield data[half:]
    yield f"data: [DONE]{newline}{newline}".encode()


def tool_result(expression: str, content: str, ok: bool = True) -> dict:
    """A built-in calculator call the server ran, as its `tool_results` delta sends it."""
    return {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
            "content": content, "ok": ok}


TOOL_OK = tool_result("12*7", "84")
TOOL_FAILED = tool_result(XSS_IMG, f"error: {XSS_SCRIPT}", ok=False)  # markup in a tool's text
TOOL_BEFORE = "Let me compute. 🧮 "  # text written before the first call (an emoji: two UTF-16 units, one point)


def tool_answer(n: int) -> tuple[str, str, str]:
    """The fake's answer N with tools: the text before round 1, between rounds 1 and 2, and after round 2."""
    return TOOL_BEFORE, f"Answer {n}: it is 84", " and that one failed."


def tool_chunk(turns: list[dict]) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-model",
            "choices": [{"index": 0, "delta": {"tool_results": turns}, "logprobs": None, "finish_reason": None}]}


async def tool_events(n: int):
    """What `chatforge serve --builtin-tools` streams for an answer that ran the calculator twice: text,
    a `tool_results` delta (the engine ran a call), more text, a failed call, the rest."""
    before, between, after = tool_answer(n)
    frames = [chunk(role=True), chunk(before), tool_chunk([TOOL_OK]), chunk(between), tool_chunk([TOOL_FAILED]),
              chunk(after), chunk(finish="stop")]
    for frame in frames:
        yield f"data: {json.dumps(frame)}\n\n".encode()
        await asyncio.sleep(0.005)
    yield b"data: [DONE]\n\n"


async def failing_events():
    yield f"data: {json.dumps(chunk(role=True))}\n\ndata: {json.dumps(chunk('Partial'))}\n\n".encode()
    error = {"error": {"message": "the engine failed", "type": "server_error", "param": None, "code": None}}
    yield f"data: {json.dumps(error)}\n\n".encode()


async def slow_events(progress: dict):
    try:
        yield f"data: {json.dumps(chunk(role=True))}\n\n".encode()
        for _ in range(SLOW_TICKS):
            await asyncio.sleep(0.025)
            progress["sent"] += 1
            yield f"data: {json.dumps(chunk('tick '))}\n\n".encode()
        yield f"data: {json.dumps(chunk(finish='length'))}\n\ndata: [DONE]\n\n".encode()
    finally:
        progress["closed"] = True


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path / 'chat.db'}"


@pytest.fixture
def fake(db_url):
    app = fake_app(db_url)
    with LiveServer(app) as server:
        yield server, app


def idle(page) -> None:
    """Wait until the page streams and stores nothing."""
    from playwright.sync_api import expect

    expect(page.locator("body")).not_to_have_class(re.compile(r"\bbusy\b"))


def send(page, text: str) -> None:
    idle(page)
    page.fill("#input", text)
    page.click("#send")


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The page against the fake endpoint


def test_answers_stream_into_a_multi_turn_conversation_that_is_stored_and_listed(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    expect(page.locator("#model")).to_have_value("fake-model")  # from /v1/models
    page.fill("#system-prompt", "You are terse.")
    page.fill("#temperature", "0.3")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "50")
    send(page, "hello")
    answers = page.locator(".msg.assistant .content")
    expect(answers).to_have_text(["Answer 1 to: hello"])
    idle(page)
    page.fill("#input", "and again")
    page.press("#input", "Enter")
    expect(answers).to_have_text(["Answer 1 to: hello", "Answer 2 to: and again"])
    idle(page)

    body = app.state.requests[-1]
    assert body["stream"] is True and body["model"] == "fake-model"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 50)
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "Answer 1 to: hello"},
                                {"role": "user", "content": "and again"}]
    expect(page.locator("#conversations li .open")).to_have_text(["hello"])

    store = app.state.chat_store
    (conv,) = store.list_conversations()
    stored = store.get_conversation(conv["id"])
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", "hello"), ("assistant", "Answer 1 to: hello"), ("user", "and again"),
        ("assistant", "Answer 2 to: and again")]
    assert stored["messages"][-1]["params"] == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 50}
    assert stored["messages"][-1]["system"] == "You are terse." and stored["system_prompt"] == "You are terse."

    page.reload()  # a fresh page reads it all back from the database
    expect(page.locator(".msg")).to_have_count(0)
    page.click("#conversations li .open")
    expect(answers).to_have_text(["Answer 1 to: hello", "Answer 2 to: and again"])
    expect(page.locator("#system-prompt")).to_have_value("You are terse.")
    expect(page.locator("#max-tokens")).to_have_value("50")


def test_regenerate_makes_a_branch_and_thumbs_on_both_versions_export_as_a_pair(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    send(page, "hi")
    answer = page.locator(".msg.assistant .content")
    expect(answer).to_have_text(["Answer 1 to: hi"])
    page.click(".msg.assistant .regenerate")
    expect(answer).to_have_text(["Answer 2 to: hi"])
    expect(page.locator(".branch-pos")).to_have_text("2/2")
    assert app.state.requests[0]["messages"] == app.state.requests[1]["messages"] == [
        {"role": "user", "content": "hi"}]
    page.click(".thumb.down")
    expect(page.locator(".thumb.down")).to_have_attribute("aria-pressed", "true")
    page.click(".branch-prev")
    expect(answer).to_have_text(["Answer 1 to: hi"])
    expect(page.locator(".branch-pos")).to_have_text("1/2")
    expect(page.locator(".thumb.down")).to_have_attribute("aria-pressed", "false")
    page.click(".thumb.up")
    expect(page.locator(".thumb.up")).to_have_attribute("aria-pressed", "true")

    records, stats = preference_records(app.state.chat_store)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in records] == [
        ([{"role": "user", "content": "hi"}], "Answer 1 to: hi", "Answer 2 to: hi", "thumbs")]
    page.click(".thumb.up")  # a second click takes the thumb back
    expect(page.locator(".thumb.up")).to_have_attribute("aria-pressed", "false")
    assert preference_records(app.state.chat_store)[0] == []


def test_stop_aborts_the_stream_and_keeps_the_partial_answer(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    send(page, "slow answer please")
    streaming = page.locator(".msg.assistant.streaming .content")
    expect(streaming).to_contain_text("tick tick tick")
    expect(page.locator("#send")).to_be_disabled()
    page.click("#stop")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator(".msg.assistant .note")).to_have_text("(stopped)")
    wait_until(lambda: app.state.slow["closed"])  # the server saw the request go away
    assert app.state.slow["sent"] < SLOW_TICKS
    text = page.locator(".msg.assistant .content").text_content()
    assert re.fullmatch(r"(tick )+", text)
    (conv,) = app.state.chat_store.list_conversations()
    last = app.state.chat_store.get_conversation(conv["id"])["messages"][-1]
    assert (last["role"], last["content"], last["finish_reason"]) == ("assistant", text, "stopped")


def test_model_and_user_text_is_shown_as_text_and_never_runs(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    question = f'xss {XSS_IMG} <b>hi</b>'
    send(page, question)
    expect(page.locator(".msg.assistant .content")).to_have_text([XSS_ANSWER])
    expect(page.locator(".msg.user .content")).to_have_text([question])
    expect(page.locator("#conversations li .open")).to_have_text([question])
    page.check("#compare-mode")  # the compare panels render answers too
    send(page, "xss again")
    expect(page.locator("#answer-a")).to_have_text(XSS_ANSWER)
    expect(page.locator("#answer-b")).to_have_text(XSS_ANSWER)
    page.wait_for_timeout(300)  # time for an injected image to fail to load and fire onerror
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main script, main b, aside img, aside b").count() == 0
    page.reload()
    page.click("#conversations li .open")
    expect(page.locator(".msg.assistant .content")).to_have_text([XSS_ANSWER])
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main script, main b").count() == 0


def answer_parts(page, selector: str) -> list[str]:
    """An answer's pieces in order: its text ("T:...") and its tool cards ("C:" and the card's summary)."""
    return page.locator(selector).evaluate(
        "node => [...node.childNodes].map(n => n.nodeType === Node.TEXT_NODE ? 'T:' + n.data"
        " : 'C:' + n.querySelector('summary').textContent)")


def tool_parts(n: int) -> list[str]:
    """What the page shows of the fake's answer N with tools: the cards where the calls happened."""
    before, between, after = tool_answer(n)
    return [f"T:{before}", "C:calculator · 12*7 → 84", f"T:{between}",
            f"C:⚠ calculator · {XSS_IMG} → {TOOL_FAILED['content']}", f"T:{after}"]


def tool_turns(n: int) -> list[dict]:
    """The fake's answer N's tool turns as stored: each where it happened (code points), in its round."""
    before, between, _ = tool_answer(n)
    return [{**TOOL_OK, "at": len(before), "round": 0}, {**TOOL_FAILED, "at": len(before + between), "round": 1}]


def tool_messages(n: int) -> list[dict]:
    """The fake's answer N with tools as exported: the OpenAI messages the model wrote and read."""
    before, between, after = tool_answer(n)

    def call(i: int, turn: dict) -> dict:
        return {"id": f"call_{i}", "type": "function", "function": turn["function"]}

    return [{"role": "assistant", "content": before, "tool_calls": [call(1, TOOL_OK)]},
            {"role": "tool", "tool_call_id": "call_1", "content": TOOL_OK["content"]},
            {"role": "assistant", "content": between, "tool_calls": [call(2, TOOL_FAILED)]},
            {"role": "tool", "tool_call_id": "call_2", "content": TOOL_FAILED["content"]},
            {"role": "assistant", "content": after}]


def check_cards(page, expect, scope: str) -> None:
    """The two tool cards in `scope`: collapsed to one line, open on a click, text only; the failed one marked."""
    cards = page.locator(f"{scope} .tool-card")
    expect(cards).to_have_count(2)
    ok, failed = cards.nth(0), cards.nth(1)
    expect(failed).to_have_class(re.compile(r"\berror\b"))
    expect(ok).not_to_have_class(re.compile(r"\berror\b"))
    expect(ok.locator(".tool-detail")).to_be_hidden()  # collapsed
    ok.locator("summary").click()
    expect(ok.locator(".tool-detail")).to_be_visible()
    expect(ok.locator("dt")).to_have_text(["Tool", "Arguments", "Result"])
    expect(ok.locator("dd")).to_have_text(["calculator", '{\n  "expression": "12*7"\n}', "84"])
    failed.locator("summary").click()
    expect(failed.locator("dt")).to_have_text(["Tool", "Arguments", "Error"])
    expect(failed.locator("dd").nth(2)).to_have_text(TOOL_FAILED["content"])
    ok.locator("summary").click()
    expect(ok.locator(".tool-detail")).to_be_hidden()  # and closed again
    page.wait_for_timeout(300)  # time for an injected image to fail to load and fire onerror
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main script").count() == 0


def test_built_in_tool_calls_show_as_cards_in_the_answer_are_kept_and_export_as_tool_turns(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    send(page, "tool time: what is 12*7?")
    expect(page.locator(".msg.assistant .tool-card")).to_have_count(2)
    idle(page)
    assert answer_parts(page, ".msg.assistant .content") == tool_parts(1)  # each card where its call happened
    check_cards(page, expect, ".msg.assistant")
    store = app.state.chat_store
    (conv,) = store.list_conversations()
    answer = store.get_conversation(conv["id"])["messages"][-1]
    assert answer["content"] == "".join(tool_answer(1)) and answer["tool_turns"] == tool_turns(1)
    assert answer["tools"] is None  # the fake serves no built-in tools of its own

    page.reload()  # read back from the database: the same cards in the same places
    page.click("#conversations li .open")
    expect(page.locator(".msg.assistant .tool-card")).to_have_count(2)
    assert answer_parts(page, ".msg.assistant .content") == tool_parts(1)
    check_cards(page, expect, ".msg.assistant")

    page.click(".msg.assistant .regenerate")  # a second version, thumbs on both: a pair with its tool turns
    expect(page.locator(".branch-pos")).to_have_text("2/2")
    idle(page)
    assert answer_parts(page, ".msg.assistant .content") == tool_parts(2)
    assert app.state.requests[-1]["messages"] == [{"role": "user", "content": "tool time: what is 12*7?"}]
    page.click(".thumb.down")
    expect(page.locator(".thumb.down")).to_have_attribute("aria-pressed", "true")
    page.click(".branch-prev")
    expect(page.locator(".branch-pos")).to_have_text("1/2")
    assert answer_parts(page, ".msg.assistant .content") == tool_parts(1)
    page.click(".thumb.up")
    expect(page.locator(".thumb.up")).to_have_attribute("aria-pressed", "true")
    (record,), stats = preference_records(store)
    assert (record["chosen"], record["rejected"]) == (tool_messages(1), tool_messages(2))
    assert [t["function"]["name"] for t in record["tools"]] == ["calculator", "calendar"]  # the built-in ones


def test_a_comparison_shows_each_answers_tool_cards_and_exports_their_tool_turns(page, expect, fake, db_url,
                                                                                 tmp_path):
    from click.testing import CliRunner

    server, app = fake
    page.goto(server.url)
    page.check("#compare-mode")
    send(page, "tool compare")
    expect(page.locator("#prefer-a")).to_be_enabled()
    parts = {side: answer_parts(page, f"#answer-{side}") for side in "ab"}
    assert sorted(parts.values()) == [tool_parts(1), tool_parts(2)]
    n = {side: 1 if parts[side] == tool_parts(1) else 2 for side in "ab"}
    check_cards(page, expect, "#answer-a")
    check_cards(page, expect, "#answer-b")
    page.click("#prefer-b")
    expect(page.locator("#compare")).to_be_hidden()
    expect(page.locator(".branch-pos")).to_have_text("2/2")
    assert answer_parts(page, ".msg.assistant .content") == tool_parts(n["b"])  # the preferred answer goes on
    page.click(".branch-prev")
    expect(page.locator(".branch-pos")).to_have_text("1/2")
    assert answer_parts(page, ".msg.assistant .content") == tool_parts(n["a"])
    (comparison,) = app.state.chat_store.list_comparisons()
    assert (comparison["tool_turns_a"], comparison["tool_turns_b"]) == (tool_turns(n["a"]), tool_turns(n["b"]))

    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(feedback, ["export", "--db", db_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["chosen"], record["rejected"]) == (tool_messages(n["b"]), tool_messages(n["a"]))
    (pref,) = read_preferences(out).preferences
    assert [m.role for m in pref.responses[0]] == ["assistant", "tool_call", "tool_result", "assistant",
                                                   "tool_call", "tool_result", "assistant"]


def test_errors_are_shown_and_the_unanswered_message_can_be_answered_again_or_replaced(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    send(page, "fail please")
    expect(page.locator("#status")).to_contain_text("the engine failed")
    idle(page)
    expect(page.locator(".msg.assistant")).to_have_count(0)  # a broken answer is not kept
    page.click(".msg.user .retry")
    expect(page.locator("#status")).to_contain_text("the engine failed")
    idle(page)
    send(page, "refuse this")  # takes the place of the unanswered message
    expect(page.locator("#status")).to_contain_text("400: This model's maximum context length is 64 tokens")
    idle(page)
    send(page, "fine now")
    expect(page.locator(".msg .content")).to_have_text(["fine now", "Answer 1 to: fine now"])
    expect(page.locator(".msg.user .branch-pos")).to_have_text("3/3")
    expect(page.locator("#status")).to_have_text("")
    (conv,) = app.state.chat_store.list_conversations()
    assert app.state.chat_store.counts()["messages"] == 4


def test_a_comparison_can_be_discarded_while_it_streams(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    page.check("#compare-mode")
    send(page, "slow, two of them")
    expect(page.locator("#answer-a")).to_contain_text("tick tick")
    expect(page.locator("#answer-b")).to_contain_text("tick tick")
    page.click("#compare-cancel")
    expect(page.locator("#compare")).to_be_hidden()
    idle(page)
    expect(page.locator(".msg.user .retry")).to_be_visible()  # the question waits for an answer
    wait_until(lambda: app.state.slow["closed"])
    assert app.state.chat_store.counts()["comparisons"] == 0 and app.state.chat_store.counts()["messages"] == 1


def test_new_chat_clears_the_session_and_conversations_can_be_reopened_and_deleted(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    send(page, "first")
    expect(page.locator(".msg.assistant .content")).to_have_text(["Answer 1 to: first"])
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#title")).to_have_text("New chat")
    send(page, "second")
    expect(page.locator(".msg.assistant .content")).to_have_text(["Answer 2 to: second"])
    assert app.state.requests[-1]["messages"] == [{"role": "user", "content": "second"}]
    idle(page)
    items = page.locator("#conversations li .open")
    expect(items).to_have_text(["second", "first"])  # most recent first
    items.nth(1).click()
    expect(page.locator(".msg .content")).to_have_text(["first", "Answer 1 to: first"])
    page.locator("#conversations li .delete").nth(1).click()  # delete the one shown
    expect(items).to_have_text(["second"])
    expect(page.locator(".msg")).to_have_count(0)
    assert [c["title"] for c in app.state.chat_store.list_conversations()] == ["second"]


def test_api_key_is_kept_in_local_storage_and_sent_as_bearer(page, expect, db_url):
    app = fake_app(db_url, api_key="sk-test")
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#status")).to_contain_text("401")
        page.fill("#api-key", "sk-test")
        page.press("#api-key", "Tab")  # change event
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") == "sk-test"
        expect(page.locator("#model")).to_have_value("fake-model")
        send(page, "hi")
        expect(page.locator(".msg.assistant .content")).to_have_text(["Answer 1 to: hi"])
        page.reload()
        expect(page.locator("#api-key")).to_have_value("sk-test")
        expect(page.locator("#conversations li .open")).to_have_text(["hi"])
    after = app.state.seen[app.state.seen.index(("/v1/models", "Bearer sk-test")):]
    used = {path for path, auth in after if path.startswith(("/api/", "/v1/"))}
    assert {"/v1/models", "/v1/chat/completions", "/api/conversations"} <= used
    assert {auth for path, auth in after if path.startswith(("/api/", "/v1/"))} == {"Bearer sk-test"}


def test_a_comparison_made_in_the_browser_becomes_a_pair_the_reward_model_trains_on(page, expect, fake, db_url,
                                                                                    tmp_path, small_tokenizer):
    from click.testing import CliRunner
    from test_cli import run_cli

    from chatforge.checkpoint import load_checkpoint, save_checkpoint
    from chatforge.model import GPT, GPTConfig, ScalarHeadModel

    server, app = fake
    page.goto(server.url)
    page.fill("#system-prompt", "Answer in one word.")
    page.check("#compare-mode")
    send(page, "Which city?")
    expect(page.locator("#prefer-b")).to_be_enabled()
    expect(page.locator(".regenerate, .retry")).to_have_count(0)  # the choice comes first
    a, b = page.locator("#answer-a").text_content(), page.locator("#answer-b").text_content()
    assert {a, b} == {"Answer 1 to: Which city?", "Answer 2 to: Which city?"}
    page.click("#prefer-b")
    expect(page.locator("#compare")).to_be_hidden()
    expect(page.locator(".msg.assistant .content")).to_have_text([b])  # the preferred answer goes on
    expect(page.locator(".branch-pos")).to_have_text("2/2")
    expect(page.locator("#status")).to_contain_text("B is better")

    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(feedback, ["export", "--db", db_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 preference record (1 from comparisons" in result.output
    (pref,) = read_preferences(out).preferences
    assert [(m.role, m.content) for m in pref.prompt] == [("system", "Answer in one word."), ("user", "Which city?")]
    assert pref.texts() == [b, a]

    torch.manual_seed(0)
    sft = tmp_path / "sft"
    save_checkpoint(sft, GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1,
                                       n_head=2, n_embd=16)), tokenizer=small_tokenizer)
    status = run_cli("reward", "--init-from", sft, "--data", out, "--val", out, "--out", tmp_path / "rm",
                     "--max-steps", "2", "--batch-size", "1", "--warmup-steps", "1", "--eval-every", "2",
                     "--save-every", "2", "--normalize-samples", "0", "--no-progress")
    assert status == 0
    assert isinstance(load_checkpoint(tmp_path / "rm").model, ScalarHeadModel)


def test_max_tokens_fits_the_models_context_so_the_first_message_is_answered(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    field = page.locator("#max-tokens")
    expect(field).to_have_value(str(FAKE_CONTEXT // 2))  # from /v1/models' context_length, not 256
    expect(field).to_have_attribute("max", str(FAKE_CONTEXT - 1))
    send(page, "hello")
    expect(page.locator(".msg.assistant .content")).to_have_text(["Answer 1 to: hello"])
    expect(page.locator("#status")).to_have_text("")
    assert app.state.requests[-1]["max_tokens"] == FAKE_CONTEXT // 2
    assert app.state.requests[-1]["truncation"] == "auto"

    def reload_with(stored: dict) -> None:
        page.evaluate("s => localStorage.setItem('chatforge.settings', JSON.stringify(s))", stored)
        page.reload()
        expect(page.locator("#model")).to_have_value("fake-model")

    reload_with({"max_tokens": 256, "temperature": 0.5})  # what an older page stored: it cannot fit
    expect(field).to_have_value(str(FAKE_CONTEXT // 2))
    expect(page.locator("#temperature")).to_have_value("0.5")
    reload_with({"max_tokens": 100})  # a choice that fits is kept
    expect(field).to_have_value("100")
    page.fill("#max-tokens", "1000")
    page.press("#max-tokens", "Tab")  # change event
    expect(field).to_have_value(str(FAKE_CONTEXT // 2))
    assert page.evaluate("JSON.parse(localStorage.getItem('chatforge.settings')).max_tokens") == FAKE_CONTEXT // 2


def test_a_chat_longer_than_the_context_goes_on_and_says_quietly_what_was_left_out(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    page.fill("#system-prompt", "Be brief.")
    status = page.locator("#status")
    questions = [f"question {i}" for i in range(1, 6)]
    for i, question in enumerate(questions):
        send(page, question)
        expect(page.locator(".msg.assistant .content")).to_have_count(i + 1)
        idle(page)
        dropped = 2 * i - FAKE_TURNS + 1  # the fake keeps the last turn and the one before
        if dropped > 0:
            expect(status).to_have_text(f"{dropped} older messages were left out to fit the model's "
                                        f"{FAKE_CONTEXT}-token context.")
            expect(status).not_to_have_class(re.compile(r"\berror\b"))
        else:
            expect(status).to_have_text("")
    expect(page.locator(".msg.assistant .content")).to_have_text(
        [f"Answer {i} to: {q}" for i, q in enumerate(questions, 1)])
    assert [body["truncation"] for body in app.state.requests] == ["auto"] * len(questions)
    assert len(app.state.requests[-1]["messages"]) == 1 + 2 * len(questions) - 1  # the page sends it all


def test_an_error_goes_when_the_message_is_answered_again_or_a_new_one_is_sent(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    status = page.locator("#status")
    send(page, "flaky question")
    expect(status).to_have_text("answer: the engine failed")
    expect(status).to_have_class(re.compile(r"\berror\b"))
    idle(page)
    page.click(".msg.user .retry")  # the second try succeeds
    expect(page.locator(".msg.assistant .content")).to_have_text(["Answer 1 to: flaky question"])
    expect(status).to_have_text("")
    expect(status).not_to_have_class(re.compile(r"\berror\b"))
    idle(page)
    send(page, "flaky again")
    expect(status).to_have_text("answer: the engine failed")
    idle(page)
    send(page, "something else")
    expect(page.locator(".msg.assistant .content")).to_have_text(
        ["Answer 1 to: flaky question", "Answer 2 to: something else"])
    expect(status).to_have_text("")


def test_the_empty_page_offers_example_prompts_and_one_click_sends_one(page, expect, fake):
    server, app = fake
    page.goto(server.url)
    examples = page.locator("#messages .example")
    expect(examples).to_have_text(list(GENERIC_EXAMPLES))  # no server state: the generic ones
    examples.first.click()
    first = GENERIC_EXAMPLES[0]
    expect(page.locator(".msg .content")).to_have_text([first, f"Answer 1 to: {first}"])
    expect(examples).to_have_count(0)  # a conversation has started
    assert app.state.requests[-1]["messages"] == [{"role": "user", "content": first}]
    expect(page.locator("#conversations li .open")).to_have_text([first])
    page.click("#new-chat")
    expect(examples).to_have_text(list(GENERIC_EXAMPLES))


def test_examples_from_the_server_are_shown_as_text(page, expect, db_url):
    from types import SimpleNamespace

    app = fake_app(db_url, api_key="sk-test")
    app.state.chatforge = SimpleNamespace(examples=["What is 2 plus 2?", XSS_IMG], examples_source="training")
    with LiveServer(app) as server:
        denied = page.request.get(f"{server.url}/api/examples")
        assert denied.status == 401  # like every /api/ route
        page.goto(server.url)
        page.evaluate("localStorage.setItem('chatforge.apiKey', 'sk-test')")
        page.reload()
        expect(page.locator("#messages .example")).to_have_text(["What is 2 plus 2?", XSS_IMG])
        expect(page.locator("#messages .examples-intro")).to_contain_text("trained on")
        page.locator("#messages .example").nth(1).click()
        expect(page.locator(".msg .content")).to_have_text([XSS_IMG, f"Answer 1 to: {XSS_IMG}"])
        page.wait_for_timeout(300)  # time for an injected image to fail to load and fire onerror
        assert page.evaluate("window.__pwned") is None
        assert page.locator("main img").count() == 0


def test_the_page_has_a_favicon_and_loads_without_a_404(page, expect, fake):
    server, app = fake
    failed: list[str] = []
    page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(server.url)
    expect(page.locator("#model")).to_have_value("fake-model")
    icon = page.locator("link[rel=icon]")
    href = icon.get_attribute("href")
    for path in ("/favicon.ico", href):
        response = page.request.get(server.url + path)
        assert response.status == 200, path
        assert response.headers["content-type"].startswith("image/svg+xml"), path
        assert response.body().startswith(b"<svg")
    idle(page)
    page.wait_for_timeout(300)  # the browser's own favicon request, if it makes one
    assert failed == []
    csp = page.request.get(server.url).headers["content-security-policy"]
    assert "img-src 'self'" in csp  # the icon is the page's own file


# ---------------------------------------------------------------------------------------------
# The page against the real server


def real_app(small_tokenizer, db_url: str, context_length: int, examples: tuple[list[str], str] | None = None,
             **config):
    """The OpenAI-compatible server with the web page, on a tiny random model (`config`: more ServeConfig fields)."""
    try:
        from chatforge.serve.app import ServeConfig, create_app
    except ImportError as e:
        pytest.skip(f"the OpenAI-compatible server is not importable (chatforge.serve.app: {e})")
    from chatforge.generate.engine import Engine
    from chatforge.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=context_length, n_layer=1, n_head=2,
                          n_embd=16))
    return create_app(Engine(model.eval(), small_tokenizer, max_batch_size=4),
                      ServeConfig(model_name="tiny", db_url=db_url, **config), examples=examples)


def seed_sampling(page, first_seed: int = 1) -> list[dict]:
    """Seed each chat request the page makes; returns the list the page's request bodies go to.

    Unseeded, the random model's first sampled token ends the turn about 1% of the time, and an
    empty answer (rightly) is an error: seeded, the run is the same every time."""
    seeds, bodies = itertools.count(first_seed), []

    def seed(route) -> None:
        body = json.loads(route.request.post_data or "{}")
        bodies.append(body)
        route.continue_(post_data=json.dumps({**body, "seed": next(seeds)}))

    page.route("**/v1/chat/completions", seed)
    return bodies


def test_the_page_chats_and_compares_with_the_real_server(page, expect, tmp_path, small_tokenizer, db_url):
    app = real_app(small_tokenizer, db_url, context_length=64)
    seed_sampling(page)
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#model")).to_have_value("tiny")
        page.fill("#max-tokens", "8")
        page.fill("#temperature", "0")  # greedy: the same answer every run
        send(page, "What is the capital of Veloria?")
        answer = page.locator(".msg.assistant .content")
        expect(answer).to_have_count(1, timeout=30_000)
        idle(page)
        expect(page.locator("#status")).to_have_text("")
        assert answer.text_content().strip()  # a random tiny model says something
        page.click(".thumb.up")
        expect(page.locator(".thumb.up")).to_have_attribute("aria-pressed", "true")
        page.fill("#temperature", "1")
        page.check("#compare-mode")  # two streams at once through the engine
        send(page, "And Mira?")
        expect(page.locator("#prefer-a")).to_be_enabled(timeout=30_000)
        page.click("#prefer-a")
        expect(page.locator("#compare")).to_be_hidden()
        idle(page)
    store = app.state.chat_store
    (conv,) = store.list_conversations()
    messages = store.get_conversation(conv["id"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"] and messages[1]["rating"] == 1
    (comparison,) = store.list_comparisons()
    assert comparison["choice"] == "a" and messages[3]["content"] == comparison["answer_a"]
    assert comparison["answer_a"] != comparison["answer_b"]  # two samples, not one answer twice
    assert [m["content"] for m in comparison["prompt"]] == [m["content"] for m in messages[:3]]


def test_a_long_chat_with_the_real_server_goes_on_past_the_models_context(page, expect, tmp_path, small_tokenizer,
                                                                          db_url):
    questions = ["What is the capital of Veloria?", "And Mira?", "What is 7 plus 7?", "Tell me more.",
                 "Who walked the dog?", "One more?"]
    app = real_app(small_tokenizer, db_url, context_length=128, examples=(questions[:1], "training"))
    bodies = seed_sampling(page, first_seed=10)  # seeds under which no answer is empty
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#model")).to_have_value("tiny")
        expect(page.locator("#max-tokens")).to_have_value("64")  # the page's defaults, fitted to 128 tokens
        expect(page.locator("#max-tokens")).to_have_attribute("max", "127")
        status = page.locator("#status")
        answers = page.locator(".msg.assistant .content")
        for i, question in enumerate(questions):
            if i == 0:  # the server's example prompt, one click
                expect(page.locator("#messages .example")).to_have_text(questions[:1])
                page.click("#messages .example")
            else:
                send(page, question)
            expect(answers).to_have_count(i + 1, timeout=30_000)
            idle(page)
            expect(status).not_to_have_class(re.compile(r"\berror\b"))
            if i == 0:
                expect(status).to_have_text("")  # the first message fits whole
        expect(status).to_contain_text("left out to fit the model's 128-token context")
    assert [b["truncation"] for b in bodies] == ["auto"] * len(questions)
    (conv,) = app.state.chat_store.list_conversations()
    messages = app.state.chat_store.get_conversation(conv["id"])["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == questions
    assert all(m["content"].strip() for m in messages)


def test_the_real_server_runs_a_built_in_tool_and_the_page_shows_keeps_and_records_it(page, expect, db_url):
    """`chatforge serve --builtin-tools` with a tiny model that learnt one calculator conversation by heart."""
    from memorize import memorize

    from chatforge.chat import Conversation, Message, tools_block
    from chatforge.tokenizer import Tokenizer
    from chatforge.tools import builtin_tools

    try:
        from chatforge.serve.app import ServeConfig, create_app
    except ImportError as e:
        pytest.skip(f"the OpenAI-compatible server is not importable (chatforge.serve.app: {e})")
    from chatforge.generate.engine import Engine

    specs = [t.spec() for t in builtin_tools().values()]  # what the server shows the model
    call = Message("tool_call", json.dumps({"name": "calculator", "arguments": {"expression": "12*7"}}))
    lesson = Conversation([Message("user", "What is 12*7?"), call, Message("tool_result", "84"),
                           Message("assistant", "It is 84.")], tools=specs)
    tokenizer = Tokenizer.train([tools_block(specs)] + [m.content for m in lesson.messages] * 20, vocab_size=600)
    model = memorize(tokenizer, [lesson], context_length=512)
    app = create_app(Engine(model, tokenizer, max_batch_size=4),
                     ServeConfig(model_name="tiny", db_url=db_url, builtin_tools=True))
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#model")).to_have_value("tiny")
        page.fill("#temperature", "0")  # greedy: what the model learnt
        page.fill("#max-tokens", "64")  # the tools' specs in the system turn take half the context
        send(page, "What is 12*7?")
        expect(page.locator(".msg.assistant .tool-card")).to_have_count(1, timeout=30_000)
        idle(page)
        expect(page.locator("#status")).to_have_text("")
        assert answer_parts(page, ".msg.assistant .content") == ["C:calculator · 12*7 → 84", "T:It is 84."]
        page.click(".msg.assistant .tool-card summary")
        expect(page.locator(".msg.assistant .tool-card dd")).to_have_text(
            ["calculator", '{\n  "expression": "12*7"\n}', "84"])
        page.reload()
        page.click("#conversations li .open")
        expect(page.locator(".msg.assistant .tool-card")).to_have_count(1)
        assert answer_parts(page, ".msg.assistant .content") == ["C:calculator · 12*7 → 84", "T:It is 84."]
    (conv,) = app.state.chat_store.list_conversations()
    answer = app.state.chat_store.get_conversation(conv["id"])["messages"][-1]
    assert answer["tool_turns"] == [{"type": "function", "function": {"name": "calculator",
                                                                       "arguments": '{"expression": "12*7"}'},
                                     "content": "84", "ok": True, "at": 0, "round": 0}]
    assert answer["tools"] == specs  # the server recorded the functions the model was shown


# ---------------------------------------------------------------------------------------------
# The "check a text" panel (POST /v1/detect)


def watermarked_answer(url: str, tokenizer, tokens: int = 120) -> str:
    """An answer of the server at `url` (watermarked when it has a key): the tiny random model sampling at
    temperature 1 among the plain-text tokens (printable ASCII, newlines), so the text is what was generated."""
    import httpx

    def plain(i: int) -> bool:
        data = tokenizer.token_bytes(i)
        return i not in tokenizer.special_ids.values() and all(32 <= b < 127 or b == 10 for b in data)

    bias = {str(i): -100 for i in range(tokenizer.vocab_size) if not plain(i)}
    r = httpx.post(url + "/v1/completions", timeout=30, json={"model": "tiny", "prompt": "Kesh", "max_tokens": tokens,
                                                               "seed": 5, "logit_bias": bias})
    return r.json()["choices"][0]["text"]


def test_the_check_panel_shows_the_verdict_of_v1_detect_and_the_passage_as_text(page, expect, small_tokenizer,
                                                                              db_url):
    import httpx

    app = real_app(small_tokenizer, db_url, context_length=256, watermark_key="panel key")
    with LiveServer(app) as server:
        marked = watermarked_answer(server.url, small_tokenizer)
        pasted = f"{marked[:60]} {XSS_IMG} {marked[60:]}"  # markup inside the watermarked passage
        expected = httpx.post(server.url + "/v1/detect", json={"input": pasted, "windowed": True}).json()["data"][0]
        page.goto(server.url)
        expect(page.locator("#detect")).to_be_hidden()
        page.click("#detect-toggle")
        note = page.locator("#detect-note")
        expect(note).to_contain_text("This server watermarks every answer (lefthash, gamma 0.25)")
        page.fill("#detect-input", pasted)
        page.click("#detect-run")
        expect(page.locator("#detect-verdict")).to_have_text("Watermarked")
        rows = page.locator("#detect-result dd")
        expect(rows.nth(0)).to_have_text(f"{expected['z']:.2f} (threshold 4)")
        expect(rows.nth(2)).to_contain_text(f"{expected['tokens_scored']} (")
        passage = page.locator("#detect-result .passage")
        expect(passage).to_have_count(1)
        assert passage.text_content() == expected["window"]["text"] and XSS_IMG in passage.text_content()
        page.wait_for_timeout(300)  # time for an injected image to fail to load and fire onerror
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#detect img, #detect script").count() == 0
        page.fill("#detect-input", "Kesh")
        page.click("#detect-run")
        expect(page.locator("#detect-verdict")).to_have_text("Too short to tell")
        expect(page.locator("#detect-result")).to_contain_text("a verdict needs at least 16")
        page.click("#detect-close")
        expect(page.locator("#detect")).to_be_hidden()


def test_the_check_panel_says_when_the_server_has_no_watermark_key(page, expect, small_tokenizer, db_url):
    app = real_app(small_tokenizer, db_url, context_length=64)
    with LiveServer(app) as server:
        page.goto(server.url)
        page.click("#detect-toggle")
        expect(page.locator("#detect-note")).to_contain_text("does not watermark its answers")
        expect(page.locator("#detect-run")).to_be_disabled()

        def unsaid(route) -> None:  # a model card that does not say: the 400 from /v1/detect tells the page
            response = route.fetch()
            body = response.json()
            for model in body["data"]:
                model.pop("watermark")
            route.fulfill(response=response, json=body)

        page.route("**/v1/models", unsaid)
        page.reload()
        page.click("#detect-toggle")
        expect(page.locator("#detect-run")).to_be_enabled()
        page.fill("#detect-input", "Mira walked her dog.")
        page.click("#detect-run")
        expect(page.locator("#detect-result .error")).to_contain_text("does not watermark its answers")
        expect(page.locator("#detect-note")).to_contain_text("does not watermark its answers")
        expect(page.locator("#detect-run")).to_be_disabled()
