"""The two endpoints' response shapes (serve/formats.py): the one place where /v1/completions and
/v1/chat/completions differ. The job that drives both (serve/jobs.py) is shared; the end-to-end
shapes are pinned by test_serve_api.py, these pin each formatter on its own."""

from __future__ import annotations

import inspect
import re

import pytest

pytest.importorskip("fastapi")

from chatforge.generate.engine import Completion, StreamEvent, TokenLogprob  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402
from chatforge.serve import jobs  # noqa: E402
from chatforge.serve.formats import (  # noqa: E402
    DROPPED_HEADER,
    MIN_LOGPROB,
    ChatFormat,
    CompletionFormat,
    FinishedChoice,
)
from chatforge.serve.state import Prompt  # noqa: E402


@pytest.fixture
def tok(small_tokenizer):
    return small_tokenizer


def make(cls, tok, *, include_usage=False, params=None, **kw):
    return cls(tok, SamplingParams(max_tokens=4, **(params or {})), model_name="m", include_usage=include_usage, **kw)


def prompt_of(tok, text="The capital"):
    return Prompt(tok.encode(text), text)


def test_both_formats_share_envelope_and_usage_and_differ_in_names(tok):
    comp, chat = make(CompletionFormat, tok, include_usage=True), make(ChatFormat, tok, include_usage=True)
    assert comp.id.startswith("cmpl-") and chat.id.startswith("chatcmpl-")
    for fmt, name, chunk_name in ((comp, "text_completion", "text_completion"),
                                  (chat, "chat.completion", "chat.completion.chunk")):
        usage = fmt.usage(3, 2)
        assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        response = fmt.response([], usage)
        assert list(response) == ["id", "object", "created", "model", "choices", "usage"]
        assert response["object"] == name and response["model"] == "m"
        assert fmt.chunk([])["object"] == chunk_name
        assert fmt.chunk([])["usage"] is None and fmt.chunk([], usage)["usage"] == usage  # only the last has it
        assert fmt.headers == {}
    assert "usage" not in make(CompletionFormat, tok).chunk([])  # without include_usage


def test_completion_choices_and_deltas_are_text(tok):
    fmt = make(CompletionFormat, tok)
    assert fmt.choice(1, "hi", None, "stop") == {"index": 1, "text": "hi", "logprobs": None, "finish_reason": "stop"}
    assert fmt.delta(0, None, None, "content_filter") == {"index": 0, "text": "", "logprobs": None,
                                                          "finish_reason": "content_filter"}
    assert fmt.opening_chunks([0, 1]) == [] and fmt.prompt_chunks(prompt_of(tok), [0], None) == []  # no echo


def test_chat_choices_are_messages_and_a_stream_opens_with_the_role(tok):
    fmt = make(ChatFormat, tok, dropped_messages=2)
    assert fmt.choice(0, "hi", None, "stop") == {
        "index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None}, "logprobs": None,
        "finish_reason": "stop"}
    assert fmt.delta(0, "hi")["delta"] == {"content": "hi"} and fmt.delta(0, "", None, "length")["delta"] == {}
    opening = fmt.opening_chunks([0, 1])
    assert [c["choices"] for c in opening] == [
        [{"index": i, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}] for i in (0, 1)]
    assert all(c["dropped_messages"] == 2 for c in opening) and "dropped_messages" not in fmt.chunk([])
    assert fmt.headers == {DROPPED_HEADER: "2"} and list(fmt.response([], fmt.usage(1, 1)))[-1] == "dropped_messages"
    plain = make(ChatFormat, tok)
    assert plain.headers == {} and "dropped_messages" not in plain.response([], plain.usage(1, 1))
    assert fmt.prompt_chunks(prompt_of(tok), [0], None) == []


def test_each_format_writes_its_own_logprobs_for_the_same_step(tok):
    ids = tok.encode(" is Kesh")
    entries = [TokenLogprob(t, -0.5, [(t, -0.5), (ids[-1], float("-inf"))]) for t in ids]
    event = StreamEvent("r", 0, tok.decode(ids), ids, entries)
    prompt = prompt_of(tok)
    comp = make(CompletionFormat, tok, params={"logprobs": 1}).event_logprobs(0, prompt, event)
    assert comp["tokens"] == [tok.token_bytes(t).decode() for t in ids]
    assert comp["token_logprobs"] == [-0.5] * len(ids)
    assert comp["text_offset"][0] == len(prompt.text)  # offsets count from the start of the prompt
    chat = make(ChatFormat, tok, params={"logprobs": 1}).event_logprobs(0, prompt, event)
    assert chat["refusal"] is None and [e["token"] for e in chat["content"]] == comp["tokens"]
    assert chat["content"][0]["bytes"] == list(tok.token_bytes(ids[0]))
    assert chat["content"][0]["top_logprobs"][1]["logprob"] == MIN_LOGPROB  # JSON has no -inf


def test_completion_echo_puts_the_prompt_first_streamed_or_not(tok):
    prompt = prompt_of(tok)
    prompt_logprobs = [None] + [TokenLogprob(t, -2.0) for t in prompt.ids[1:]]
    fmt = make(CompletionFormat, tok, params={"echo": True, "logprobs": 0, "n": 2})
    chunks = fmt.prompt_chunks(prompt, [2, 3], prompt_logprobs)
    assert [c["choices"][0]["index"] for c in chunks] == [2, 3]
    assert [c["choices"][0]["text"] for c in chunks] == [prompt.text] * 2
    head = chunks[0]["choices"][0]["logprobs"]
    assert head["token_logprobs"][0] is None and head["text_offset"][0] == 0

    ids = tok.encode(" is Kesh")
    completion = Completion("r", prompt.ids, [], prompt_logprobs=prompt_logprobs)
    out = FinishedChoice(1, prompt, completion, tok.decode(ids), ids, [TokenLogprob(t, -1.0) for t in ids], "length")
    whole = fmt.finished_choice(out)
    assert whole["index"] == 1 and whole["text"] == prompt.text + out.text and whole["finish_reason"] == "length"
    assert whole["logprobs"]["tokens"][: len(prompt.ids)] == head["tokens"]
    assert whole["logprobs"]["text_offset"][len(prompt.ids)] == len(prompt.text)
    chat = make(ChatFormat, tok, params={"logprobs": 0}).finished_choice(out)
    assert chat["message"]["content"] == out.text and len(chat["logprobs"]["content"]) == len(ids)


def test_the_job_never_asks_which_endpoint_it_serves():
    code = inspect.getsource(jobs).split('"""', 2)[2]  # the module without its docstring
    assert re.search(r"kind\b|\"chat|chat\.completion|text_completion|cmpl-|dropped|echo", code) is None
