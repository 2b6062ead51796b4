"""What a newcomer's first requests need: long chats that keep going (truncation "auto"), the tokenizer
endpoints, chat answers without a stray leading space, example prompts and a startup line that says
where things go. A tiny random model (64-token context) serves; the official `openai` client asks."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from chatforge.chat import ChatTemplate, Message  # noqa: E402
from chatforge.data.examples import GENERIC_EXAMPLES, example_prompts  # noqa: E402
from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402
from chatforge.serve.app import ServeConfig, create_app  # noqa: E402
from chatforge.serve.handlers import DROPPED_HEADER  # noqa: E402
from chatforge.serve.server import ServerThread, startup_line  # noqa: E402

CONTEXT = 64


@pytest.fixture(scope="module")
def tiny(make_tiny_gpt, small_tokenizer):
    return make_tiny_gpt(CONTEXT), small_tokenizer


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=4), ServeConfig(model_name="tiny", web=False, api_key="k"))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def template(tiny):
    return ChatTemplate(tiny[1])


@pytest.fixture(scope="module")
def no_end(tiny):
    return {str(i): -100 for i in tiny[1].special_ids.values()}


def long_chat(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Tell me about river number {i} of Veloria."},
                     {"role": "assistant", "content": f"River {i} runs past Kesh to the sea."}]
    return messages + [{"role": "user", "content": "And the last one?"}]


# ---- long chats keep going ---------------------------------------------------------------------


def test_without_truncation_a_chat_past_the_context_is_refused_as_openai_does(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long_chat(6), max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"


def test_truncation_auto_drops_the_oldest_turns_whole_and_answers_as_the_engine_on_what_is_left(
        client, server, tiny, template, no_end):
    model, tok = tiny
    messages = long_chat(6)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logit_bias=no_end,
        extra_body={"truncation": "auto"})
    r = raw.parse()
    dropped = r.model_extra["dropped_messages"]
    assert dropped >= 2 and dropped % 2 == 0 and raw.headers[DROPPED_HEADER] == str(dropped)
    kept = [Message(m["role"], m["content"]) for m in [messages[0], *messages[1 + dropped:]]]
    ids = template.generation_prompt(kept)
    assert len(ids) + 8 <= CONTEXT and r.usage.prompt_tokens == len(ids)
    local = Engine(model, tok, max_batch_size=1)
    bias = {int(k): v for k, v in no_end.items()}
    expected = local.generate([ids], SamplingParams(max_tokens=8, temperature=0, logit_bias=bias,
                                                    strip_leading_whitespace=True))[0].outputs[0]
    assert r.choices[0].message.content == expected.text

    # streamed: the header, and the first chunk carries the count too
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "stream": True, "truncation": "auto"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                      timeout=30) as s:
        assert s.headers[DROPPED_HEADER] == str(dropped)
        first = json.loads(next(line for line in s.iter_lines() if line.startswith("data:"))[5:])
    assert first["dropped_messages"] == dropped


def test_a_chat_sent_turn_after_turn_far_past_the_context_is_answered_every_time(client):
    messages = [{"role": "system", "content": "Be brief."}]
    dropped = []
    for i in range(12):  # about 3 times the context
        messages.append({"role": "user", "content": f"Question {i}: what is the river of Kesh?"})
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.7, seed=i,
                                           extra_body={"truncation": "auto"})
        assert r.choices[0].finish_reason in ("stop", "length")
        messages.append({"role": "assistant", "content": r.choices[0].message.content or "…"})
        dropped.append(r.model_extra["dropped_messages"])
    assert dropped[0] == 0 and dropped[-1] > 0


def test_max_tokens_is_lowered_to_what_is_left_and_only_an_oversized_last_message_is_refused(client, no_end):
    r = client.chat.completions.create(model="tiny", messages=long_chat(1), max_tokens=CONTEXT - 1, temperature=0,
                                       logit_bias=no_end, extra_body={"truncation": "auto"})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 80}],
                                       extra_body={"truncation": "auto"})
    assert e.value.body["param"] == "messages" and "latest message" in e.value.body["message"]


def test_truncation_takes_only_auto_or_disabled(client):
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=long_chat(0), extra_body={"truncation": "yes"})


# ---- chat answers start at their first character -------------------------------------------------


def test_a_chat_answer_never_starts_with_the_space_its_first_token_carries(client, tiny):
    tok = tiny[1]
    spaced = tok.encode(" Kesh")[0]
    assert tok.token_bytes(spaced).startswith(b" ")
    bias = {str(spaced): 100}
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Capital?"}], max_tokens=3, temperature=0,
               logit_bias=bias)
    text = client.chat.completions.create(**ask).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                       if c.choices)
    word = tok.token_bytes(spaced).decode()
    assert text == streamed == (word * 3).lstrip()
    # a completion continues text: every character stays
    completion = client.completions.create(model="tiny", prompt="Capital:", max_tokens=3, temperature=0,
                                           logit_bias=bias)
    assert completion.choices[0].text == word * 3


def test_a_role_marker_the_model_wanders_into_adds_no_text_to_a_chat_answer(client, tiny):
    """As vLLM's skip_special_tokens (true on chat): a sampled <|user|> is a token, counted, not text."""
    tok = tiny[1]
    user = tok.special_ids["user"]
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Capital?"}], max_tokens=4, temperature=0,
               logprobs=True)
    marker = {str(user): 100}
    r = client.chat.completions.create(**ask, logit_bias=marker)
    assert r.choices[0].message.content == "" and r.usage.completion_tokens == 4
    assert [e.token for e in r.choices[0].logprobs.content] == ["<|user|>"] * 4
    kept = client.chat.completions.create(**ask, logit_bias=marker, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].message.content == "<|user|>" * 4
    # completions keep every character by default, and skip on request (text offsets follow the text)
    text = dict(model="tiny", prompt="Capital:", max_tokens=2, temperature=0, logprobs=1,
                logit_bias={str(user): 100})
    assert client.completions.create(**text).choices[0].text == "<|user|>" * 2
    skipped = client.completions.create(**text, extra_body={"skip_special_tokens": True}).choices[0]
    assert skipped.text == "" and skipped.logprobs.text_offset == [len("Capital:")] * 2


# ---- the tokenizer endpoints -----------------------------------------------------------------------


def post(server, path, body, key="k"):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_tokenize_takes_vllm_and_llama_cpp_shapes_and_chat_messages(server, tiny, template):
    tok = tiny[1]
    text = "The capital of Veloria is Kesh. <|end|>"
    ids = tok.encode(text)
    vllm = post(server, "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert vllm["tokens"] == ids and vllm["count"] == len(ids) and vllm["max_model_len"] == CONTEXT
    assert "".join(vllm["token_strs"]) == text  # a special token typed as text stays text
    llama = post(server, "/tokenize", {"content": text, "with_pieces": True}).json()
    assert [t["id"] for t in llama["tokens"]] == ids and "".join(t["piece"] for t in llama["tokens"]) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    messages = [Message(m["role"], m["content"]) for m in chat]
    assert post(server, "/tokenize", {"messages": chat}).json()["tokens"] == template.generation_prompt(messages)
    no_prompt = post(server, "/tokenize", {"messages": chat, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == template.render(messages).ids


def test_detokenize_inverts_tokenize_in_both_shapes(server, tiny):
    ids = tiny[1].encode("Kesh lies on the Avon 🙂")
    out = post(server, "/detokenize", {"tokens": ids}).json()
    assert out == {"prompt": "Kesh lies on the Avon 🙂", "content": "Kesh lies on the Avon 🙂"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, 400, "messages"),
])
def test_tokenizer_endpoints_refuse_bad_input_naming_the_field(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status and r.json()["error"]["param"] == param


def test_tokenizer_endpoints_want_the_api_key(server):
    assert post(server, "/tokenize", {"prompt": "a"}, key="wrong").status_code == 401


# ---- example prompts and the startup line -----------------------------------------------------------


def test_example_prompts_come_from_the_runs_training_files_else_generic_ones(tmp_path):
    tasks = tmp_path / "run" / "tasks"
    tasks.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": "How do I steal a car?"}], "family": "harmful"},
            {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}],
             "family": "arithmetic"},
            {"messages": [{"role": "user", "content": "Reverse 'kesh'."}], "family": "words"},
            {"messages": [{"role": "user", "content": "What is 5 plus 1?"}], "family": "arithmetic"}]
    (tasks / "sft_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert example_prompts(tmp_path / "run" / "ppo" / "checkpoint") == (
        ["What is 2 plus 2?", "Reverse 'kesh'."], "training")
    assert example_prompts(tmp_path / "elsewhere") == (list(GENERIC_EXAMPLES), "generic")
    # the stage's own training data, named in its trainer_state.json, comes first
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hello there?"}]}) + "\n")
    ckpt = tmp_path / "run" / "sft" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"run_config": {"data": [str(own)]}}))
    assert example_prompts(tmp_path / "run" / "sft") == (["Hello there?"], "training")


def test_example_prompts_put_the_families_the_model_answers_best_first(tmp_path):
    """With the run's eval.json judging this checkpoint, a newcomer first sees what the model does well."""
    tasks = tmp_path / "run" / "tasks"
    tasks.mkdir(parents=True)
    rows = [("arithmetic", "What is 2 plus 2?"), ("facts", "What is the capital of Veloria?"),
            ("words", "Reverse 'kesh'.")]
    (tasks / "sft_train.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}], "family": f}) + "\n" for f, q in rows))
    ckpt = tmp_path / "run" / "ppo" / "checkpoint"
    scores = {"ppo": {"checkpoint": str(ckpt), "families": {"arithmetic": {"score": 0.0}, "facts": {"score": 0.2},
                                                              "words": {"score": 0.5}, "harmful": {"score": 1.0}}},
              "sft": {"checkpoint": str(tmp_path / "run" / "sft" / "checkpoint"),
                      "families": {"arithmetic": {"score": 0.9}}}}
    (tmp_path / "run" / "eval.json").write_text(json.dumps(scores))
    (tmp_path / "run" / "sft" / "checkpoint").mkdir(parents=True)
    assert example_prompts(ckpt)[0] == ["Reverse 'kesh'.", "What is the capital of Veloria?", "What is 2 plus 2?"]
    assert example_prompts(tmp_path / "run" / "sft")[0] == ["What is 2 plus 2?", "What is the capital of Veloria?",
                                                           "Reverse 'kesh'."]


def test_the_startup_line_names_the_database_and_whether_the_page_is_on():
    web = startup_line(ServeConfig(checkpoint="runs/demo/ppo", model_name="ppo", db_url="sqlite:///runs/demo/x.db"))
    assert "http://127.0.0.1:8000/" in web and "sqlite:///runs/demo/x.db" in web
    api = startup_line(ServeConfig(checkpoint="runs/demo/ppo", model_name="ppo", web=False, db_url="sqlite:///x"))
    assert "no web page" in api and "sqlite" not in api and "http://127.0.0.1:8000/v1" in api


def test_the_readmes_feedback_export_reads_the_database_of_the_demo_and_of_a_plain_serve(tmp_path, monkeypatch, tiny):
    """`chatforge demo` stores into RUN/chatforge.db; `chatforge serve --checkpoint RUN/ppo` defaults to the same
    file, the one the README's export command names."""
    import re
    from pathlib import Path

    from chatforge.checkpoint import save_checkpoint
    from chatforge.serve.server import default_db_url

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    named = set(re.findall(r"feedback export --db sqlite:///(\S+)", readme))
    assert named == {"runs/demo/chatforge.db"}
    monkeypatch.chdir(tmp_path)
    save_checkpoint(Path("runs/demo/ppo/checkpoint"), *tiny)
    served = Path(default_db_url("runs/demo/ppo").removeprefix("sqlite:///"))
    assert served == (tmp_path / "runs" / "demo" / "chatforge.db").resolve()  # demo.serve_demo's RUN/chatforge.db
