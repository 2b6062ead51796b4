"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn server.

A tiny random model (1 layer, 300-token vocabulary) serves; expected outputs come from a second
Engine on the same weights, so each test checks the HTTP layer against the engine itself.
"""

from __future__ import annotations

import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

from chatforge.chat import ChatTemplate, Message  # noqa: E402
from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402
from chatforge.serve.app import ServeConfig, create_app  # noqa: E402
from chatforge.serve.server import ServerThread  # noqa: E402

PROMPT = "The capital of Veloria"


@pytest.fixture(scope="module")
def tiny(make_tiny_gpt, small_tokenizer):
    return make_tiny_gpt(64), small_tokenizer


@pytest.fixture(scope="module")
def no_end(tiny):
    """logit_bias banning the special tokens, so greedy outputs run to max_tokens."""
    return {str(i): -100 for i in tiny[1].special_ids.values()}


def greedy_ids(local, prompt_ids, max_tokens, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return local.generate([prompt_ids], params)[0].outputs[0]


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_the_engine_and_counts_usage(client, local, tiny, no_end):
    tok = tiny[1]
    bias = {int(k): v for k, v in no_end.items()}
    expected = greedy_ids(local, tok.encode(PROMPT), 10, logit_bias=bias)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logit_bias=no_end)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_completion_stream_equals_non_stream_and_ends_with_usage(client, no_end):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logit_bias=no_end)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_starts_with_the_role_and_equals_non_stream(client, local, tiny, no_end):
    model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Kesh?"}]
    kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logit_bias=no_end)
    whole = client.chat.completions.create(**kw)
    prompt = ChatTemplate(tok).generation_prompt([Message("system", "Be brief."), Message("user", "Where is Kesh?")])
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == 8
    expected = greedy_ids(local, prompt, 8, logit_bias={int(k): v for k, v in no_end.items()})
    assert whole.choices[0].message.content == expected.text

    chunks = list(client.chat.completions.create(stream=True, **kw))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content is None and first.finish_reason is None
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_chat_turn_ends_at_the_end_token(client):
    # without the ban the random model soon says <|end|> or <|endoftext|>; either ends the turn as "stop"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=8, seed=3,
                                       logit_bias={"4": 8})
    assert {c.finish_reason for c in r.choices} <= {"stop", "length"}
    assert any(c.finish_reason == "stop" for c in r.choices)
    assert all("<|end|>" not in c.message.content for c in r.choices)


def test_n_choices_seed_reproducibility_and_streamed_indexes(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about Mira."}], max_tokens=6, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # rows sample independently
    assert 3 <= a.usage.completion_tokens <= 18

    seen: dict[int, list] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            seen.setdefault(choice.index, []).append(choice)
    assert sorted(seen) == [0, 1, 2]
    for index, items in seen.items():
        assert items[0].delta.role == "assistant" and items[0].delta.content is None
        assert sum(c.finish_reason is not None for c in items) == 1
        assert "".join(c.delta.content or "" for c in items) == a.choices[index].message.content


def test_stop_string_split_across_tokens(client, no_end):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, logit_bias=no_end)
    full = client.completions.create(logprobs=0, **kw).choices[0]
    text, tokens, offsets = full.text, full.logprobs.tokens, full.logprobs.text_offset
    start = len(PROMPT)
    stop = cut = None
    for i in range(1, len(tokens)):  # a stop string made of the end of one token and the start of the next
        left, right = tokens[i - 1], tokens[i]
        if not (left.isprintable() and right.isprintable() and left and right and "\ufffd" not in left + right):
            continue
        candidate = left[-1] + right[0]
        at = offsets[i] - start - 1
        if text.find(candidate) == at:
            stop, cut = candidate, at
            break
    assert stop is not None, f"no token boundary to test in {tokens}"
    r = client.completions.create(stop=[stop, "never-there"], **kw).choices[0]
    assert r.text == text[:cut] and r.finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_and_echo_scoring(client, local, tiny, no_end):
    tok = tiny[1]
    ids = tok.encode(PROMPT)
    bias = {int(k): v for k, v in no_end.items()}
    gen = greedy_ids(local, ids, 6, logit_bias=bias)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                                  logit_bias=no_end).choices[0]
    lp = r.logprobs
    assert r.text == gen.text
    assert lp.tokens == [tok.token_bytes(t).decode("utf-8", errors="replace") for t in gen.token_ids]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == len(tok.decode(ids)) and lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and top[token] == pytest.approx(value)  # bytes may decode alike

    # scoring a text: echo + max_tokens=0 gives every prompt token's logprob (the first has none)
    scored = client.completions.create(model="tiny", prompt=ids + gen.token_ids, max_tokens=0, echo=True,
                                       logprobs=0).choices[0]
    assert scored.text == tok.decode(ids + gen.token_ids)
    assert scored.logprobs.token_logprobs[0] is None and scored.logprobs.top_logprobs[0] is None
    assert scored.logprobs.text_offset[0] == 0
    assert len(scored.logprobs.tokens) == len(ids) + 6
    # the logit bias does not change logprobs (they are the model's), so generation and scoring agree
    assert scored.logprobs.token_logprobs[len(ids):] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert scored.finish_reason == "length"

    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, temperature=0,
                                       logprobs=1, stream=True)
    chunks = [c.choices[0] for c in echoed]
    assert chunks[0].text == PROMPT and chunks[0].logprobs.token_logprobs[0] is None


def test_chat_logprobs_format(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2).choices[0]
    content = r.logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the most likely
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
    assert "".join(bytes(e.bytes).decode("utf-8", errors="replace") for e in content) == r.message.content
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0, logprobs=True, stream=True)
    entries = [e for c in streamed for e in ((c.choices[0].logprobs.content or []) if c.choices[0].logprobs else [])]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content])
    assert all(e.top_logprobs == [] for e in entries)


def test_prompt_forms_give_one_block_of_n_choices_each(client, tiny):
    tok = tiny[1]
    r = client.completions.create(model="tiny", prompt=["Mira", "The dog"], max_tokens=2, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(tok.encode("Mira")) + len(tok.encode("The dog"))
    ids = [tok.encode("Mira"), tok.encode("Kesh is")]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    by_text = client.completions.create(model="tiny", prompt=["Mira", "Kesh is"], max_tokens=3, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    single = client.completions.create(model="tiny", prompt=ids[1], max_tokens=3, temperature=0)
    assert single.choices[0].text == by_text.choices[1].text


def test_best_of(client):
    same = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, n=2, best_of=2, stream=True))
    assert {c.choices[0].index for c in same} == {0, 1}
    best = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=1, best_of=3, seed=5)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.usage.completion_tokens >= 3  # every sampled sequence counts


def test_logit_bias_and_penalties(client, tiny):
    tok = tiny[1]
    forced = 57
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, logit_bias={str(forced): 100}, seed=0)
    assert r.choices[0].text == tok.decode([forced] * 5)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, frequency_penalty=2,
                                  presence_penalty=2, logit_bias={str(forced): 8}, logprobs=0)
    assert r.choices[0].logprobs.tokens.count(tok.token_bytes(forced).decode("utf-8", "replace")) < 5


def test_extras_top_k_min_p_repetition_penalty_and_beams(client, no_end):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, logit_bias=no_end)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    top1 = client.completions.create(temperature=1.0, seed=3, extra_body={"top_k": 1}, **kw).choices[0].text
    assert top1 == greedy
    minp = client.completions.create(temperature=1.0, seed=3, extra_body={"min_p": 1.0}, **kw).choices[0].text
    assert minp == greedy
    rep = client.completions.create(temperature=0, extra_body={"repetition_penalty": 1.5}, **kw)
    assert rep.choices[0].finish_reason == "length"
    beams = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=2,
                                      extra_body={"num_beams": 3, "length_penalty": 1.0, "early_stopping": True,
                                                  "no_repeat_ngram_size": 2})
    assert [c.index for c in beams.choices] == [0, 1]
    assert beams.choices[0].text != beams.choices[1].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          extra_body={"min_tokens": 4, "ignore_eos": True})
    assert chat.usage.completion_tokens == 4


def test_a_small_top_p_keeps_only_the_most_likely_token(client, no_end):
    # the tiny random model's next-token distribution is nearly flat over 300 tokens: sampled at a high
    # temperature it almost never picks the most likely token, so a nucleus of one token is easy to see
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, logit_bias=no_end)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    for seed in (1, 2, 3):
        nucleus = client.completions.create(temperature=1.5, top_p=1e-6, seed=seed, n=2, **kw)
        assert [c.text for c in nucleus.choices] == [greedy, greedy]  # the greedy token at every step
    chat_kw = dict(model="tiny", messages=[{"role": "user", "content": "Where is Kesh?"}], max_tokens=8,
                   logit_bias=no_end)
    chat_greedy = client.chat.completions.create(temperature=0, **chat_kw).choices[0].message.content
    chat = client.chat.completions.create(temperature=1.5, top_p=1e-6, seed=4, **chat_kw)
    assert chat.choices[0].message.content == chat_greedy
    # the same seeds without the nucleus (top_p=1) sample other tokens
    for seed in (1, 2, 3):
        full = client.completions.create(temperature=1.5, top_p=1.0, seed=seed, n=2, **kw)
        assert all(c.text != greedy for c in full.choices)
    assert client.chat.completions.create(temperature=1.5, top_p=1.0, seed=4, **chat_kw
                                          ).choices[0].message.content != chat_greedy


def test_the_user_field_is_accepted_and_answered_normally(client, no_end):
    user = "user-1234@example.org"
    kw = dict(model="tiny", max_tokens=6, temperature=0, logit_bias=no_end)
    plain = client.completions.create(prompt=PROMPT, **kw).choices[0]
    tagged = client.completions.create(prompt=PROMPT, user=user, **kw).choices[0]
    assert tagged.text == plain.text and tagged.finish_reason == "length"
    messages = [{"role": "user", "content": "hi"}]
    chat_plain = client.chat.completions.create(messages=messages, **kw)
    chat = client.chat.completions.create(messages=messages, user=user, **kw)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.content == chat_plain.choices[0].message.content
    assert chat.usage.completion_tokens == 6
    streamed = list(client.chat.completions.create(messages=messages, user=user, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_all_answer_like_alone(client, no_end):
    prompts = ["Mira", "The dog", "Kesh", "Veloria is", "2 plus", "walked"]
    kw = dict(model="tiny", max_tokens=10, temperature=0, logit_bias=no_end)
    alone = {p: client.completions.create(prompt=p, **kw).choices[0].text for p in prompts}
    together: dict[str, str] = {}

    def ask(p: str) -> None:
        together[p] = client.completions.create(prompt=p, **kw).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_metrics_and_health(client, server):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    assert 'chatforge_requests_total{endpoint="/v1/completions",status="200"}' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["chatforge_prompt_tokens_total"] > 0 and values["chatforge_completion_tokens_total"] > 0
    assert values["chatforge_time_to_first_token_seconds_count"] > 0
    assert values["chatforge_queue_length"] == 0 and values["chatforge_running_sequences"] == 0
    assert 'le="+Inf"' in text and "# TYPE chatforge_time_to_first_token_seconds histogram" in text


# ---- moderation (a stub with the interface of chatforge.serve.moderation.Moderator) --------------


class StubModerator:
    REFUSAL = "I can't help with that."

    def __init__(self, banned: list[str]) -> None:
        self.banned = banned

    def check(self, text: str) -> str | None:
        return next((f"mentions {b!r}" for b in self.banned if b in text), None)


def test_moderation_refuses_flagged_input_and_cuts_flagged_output(tiny, client, no_end):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, seed=11, logit_bias=no_end)
    sampled = client.completions.create(logprobs=0, **kw).choices[0]
    tokens = sampled.logprobs.tokens
    offsets = [o - len(PROMPT) for o in sampled.logprobs.text_offset]
    k = next(i for i in range(2, len(tokens)) if tokens[i].strip() and tokens[i] not in PROMPT and
             "\ufffd" not in tokens[i] and sampled.text.find(tokens[i]) == offsets[i])
    banned = tokens[k]  # first appears with the k-th token
    model, tok = tiny
    moderator = StubModerator(["forbidden", banned])
    app = create_app(Engine(model, tok, max_batch_size=4), ServeConfig(model_name="tiny", web=False),
                     moderator=moderator)
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a forbidden thing"}])
        assert r.choices[0].message.content == StubModerator.REFUSAL
        assert r.choices[0].finish_reason == "content_filter" and r.usage.completion_tokens == 0
        chunks = list(c.chat.completions.create(model="tiny", stream=True,
                                                messages=[{"role": "user", "content": "forbidden"}]))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == StubModerator.REFUSAL
        assert chunks[-1].choices[0].finish_reason == "content_filter"

        # the output is cut before the text that made it flagged (at a word boundary: a partial word is held
        # back until it is complete), streamed or not
        out = c.completions.create(**kw).choices[0]
        assert out.finish_reason == "content_filter"
        assert sampled.text.startswith(out.text) and banned not in out.text
        assert len(out.text) < offsets[k] + len(banned)
        assert not out.text or not out.text[-1].isalnum()
        streamed = [ch.choices[0] for ch in c.completions.create(stream=True, **kw)]
        assert "".join(ch.text for ch in streamed) == out.text
        assert streamed[-1].finish_reason == "content_filter"
        before = c.completions.create(stream=True, **{**kw, "max_tokens": k})  # stops just before the banned token
        assert "".join(ch.choices[0].text for ch in before) == sampled.text[: offsets[k]]  # nothing held back


def test_the_real_moderator_plugs_in(tiny):
    moderation = pytest.importorskip("chatforge.serve.moderation")
    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=2), ServeConfig(model_name="tiny", web=False),
                     moderator=moderation.Moderator(words=["forbidden"]))
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say something forbidden"}])
        assert r.choices[0].message.content == moderation.REFUSAL
        assert r.choices[0].finish_reason == "content_filter"
        fine = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert fine.choices[0].finish_reason in ("stop", "length")


# ---- building from a checkpoint (what `chatforge serve` does) ---------------------------------------


def test_build_app_from_a_checkpoint_names_the_model_and_the_database(tmp_path, tiny, monkeypatch):
    from click.testing import CliRunner

    from chatforge.checkpoint import save_checkpoint
    from chatforge.cli import cli
    from chatforge.serve.server import build_app, default_db_url, default_model_name

    model, tok = tiny
    save_checkpoint(tmp_path / "run" / "sft" / "checkpoint", model, tok)
    stage = tmp_path / "run" / "sft"
    assert default_model_name(stage) == "sft" and default_model_name(stage / "checkpoint") == "sft"
    assert default_db_url(stage) == f"sqlite:///{stage.parent.resolve() / 'chatforge.db'}"  # the run's, as the demo's
    app = build_app(ServeConfig(checkpoint=str(stage), web=False))
    assert app.state.chatforge.model_name == "sft"
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        assert c.completions.create(model="sft", prompt="Mira", max_tokens=2).usage.completion_tokens >= 1

    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    for flag in ("--checkpoint", "--host", "--port", "--model-name", "--api-key", "--cors-origin", "--db",
                 "--no-web", "--moderation", "--max-queue", "--no-fused", "--compile", "CHATFORGE_API_KEY"):
        assert flag in help_text


def test_serve_uses_the_fused_step_by_default_and_compiles_only_when_asked(tmp_path, tiny, monkeypatch):
    from chatforge.accel import kernels
    from chatforge.checkpoint import save_checkpoint
    from chatforge.generate.engine import Engine
    from chatforge.serve.server import build_app

    warmed = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: warmed.append(self))  # the compile itself: test_engine
    save_checkpoint(tmp_path / "sft" / "checkpoint", *tiny)
    default = build_app(ServeConfig(checkpoint=str(tmp_path / "sft"), web=False)).state.chatforge.engine
    assert default.fused == (kernels.unsupported_reason() is None) and not default.compiled
    assert warmed == [default]  # packed before the first request
    off = build_app(ServeConfig(checkpoint=str(tmp_path / "sft"), web=False, fused=False)).state.chatforge.engine
    assert not off.fused and off.fused_reason == "not asked for"
    app = build_app(ServeConfig(checkpoint=str(tmp_path / "sft"), web=False, compile=True))
    assert app.state.chatforge.engine.compiled and warmed[-1] is app.state.chatforge.engine


def test_a_fused_server_answers_concurrent_requests_through_the_fused_step_as_the_eager_engine(tiny, local, no_end):
    model, tok = tiny
    engine = Engine(model, tok, max_batch_size=8, fused=True)
    if not engine.fused:
        pytest.skip(f"no fused decode step here: {engine.fused_reason}")
    engine.warm_up()
    graph_calls = []
    engine._forward = lambda *a, **k: graph_calls.append(a)  # the fused step must take every decode step
    bias = {int(k): v for k, v in no_end.items()}
    prompts = {"Mira": 12, "The dog": 3, "Kesh": 7, "Veloria is": 9, "2 plus": 1, "walked": 5}
    want = {p: greedy_ids(local, tok.encode(p), n, logit_bias=bias, logprobs=1) for p, n in prompts.items()}
    got: dict[str, tuple[str, list[float]]] = {}
    app = create_app(engine, ServeConfig(model_name="tiny", web=False))
    with ServerThread(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)

        def ask(p: str) -> None:  # streamed, so rows join and leave the batch between steps
            chunks = list(client.completions.create(model="tiny", prompt=p, max_tokens=prompts[p], temperature=0,
                                                    logit_bias=no_end, logprobs=1, stream=True))
            got[p] = ("".join(c.choices[0].text for c in chunks if c.choices),
                      [lp for c in chunks if c.choices and c.choices[0].logprobs
                       for lp in c.choices[0].logprobs.token_logprobs])

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert {p: text for p, (text, _) in got.items()} == {p: o.text for p, o in want.items()}
    for p, (_, logprobs) in got.items():
        assert logprobs == pytest.approx([t.logprob for t in want[p].logprobs], abs=1e-4)
    assert graph_calls == []


def test_cors_is_off_by_default_and_configurable(tiny):
    model, tok = tiny
    for origins, expected in (([], None), (["http://example.org"], "http://example.org")):
        app = create_app(Engine(model, tok, max_batch_size=2), ServeConfig(model_name="t", web=False,
                                                                           cors_origins=origins))
        with ServerThread(app) as s:
            r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://example.org"})
            assert r.headers.get("access-control-allow-origin") == expected


def test_the_web_page_is_attached_when_its_module_exists(tiny, tmp_path):
    import importlib.util

    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=2),
                     ServeConfig(model_name="t", web=True, db_url=f"sqlite:///{tmp_path / 'chat.db'}"))
    with ServerThread(app) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 200
        r = httpx.get(s.url + "/")
        if importlib.util.find_spec("chatforge.serve.web") is None:  # the API alone; "/" is a 404 in OpenAI's shape
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
        else:
            assert r.status_code == 200 and "html" in r.headers["content-type"]
            assert (tmp_path / "chat.db").exists()
