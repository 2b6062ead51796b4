"""OpenAI function calling on a live server, driven by the official `openai` client (and LangChain's
ChatOpenAI): tool_calls in answers and in streams, tool results sent back, tool_choice, the legacy
functions, the server's built-in tools, and 400s naming the field.

The model memorized a few conversations whose system turn declares the tools (tests/memorize.py), so
greedy decoding writes known calls; the tokenizer is trained on those conversations' text so that the
tools block is short in tokens.
"""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from memorize import memorize  # noqa: E402

from chatforge.chat import Conversation, Message, tools_block  # noqa: E402
from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.serve.app import ServeConfig, create_app  # noqa: E402
from chatforge.serve.server import ServerThread  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402
from chatforge.tools import builtin_tools  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BUILTIN = [{"type": "function", "function": t.spec()} for t in builtin_tools().values()]


def call(name: str, **arguments) -> Message:
    return Message("tool_call", json.dumps({"name": name, "arguments": arguments}))


def conversations() -> list[Conversation]:
    kesh = call("get_weather", city="Kesh")
    return [
        Conversation([Message("user", "Weather in Kesh?"), kesh, Message("tool_result", "sunny"),
                      Message("assistant", "Sunny in Kesh.")], tools=[WEATHER]),
        Conversation([Message("user", "Weather in Kesh and Mira?"), kesh, call("get_weather", city="Mira"),
                      Message("tool_result", "sunny"), Message("tool_result", "rain"),
                      Message("assistant", "Sun, then rain.")], tools=[WEATHER]),
        Conversation([Message("user", "Hello"), Message("assistant", "Hi there.")], tools=[WEATHER]),
        Conversation([Message("user", "What is 12*7?"), call("calculator", expression="12*7"),
                      Message("tool_result", "84"), Message("assistant", "It is 84.")], tools=BUILTIN + [WEATHER]),
    ]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    convs = conversations()
    texts = [tools_block(c.tools) for c in convs] + [m.content for c in convs for m in c.messages]
    tok = Tokenizer.train(texts * 20, vocab_size=600)
    return memorize(tok, convs, context_length=512), tok


def _serve(model_and_tokenizer, **config):
    model, tok = model_and_tokenizer
    app = create_app(Engine(model, tok, max_batch_size=4), ServeConfig(model_name="tiny", web=False, **config))
    return ServerThread(app)


@pytest.fixture(scope="module")
def client(model_and_tokenizer):
    with _serve(model_and_tokenizer) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30), s


@pytest.fixture(scope="module")
def builtin_client(model_and_tokenizer):
    with _serve(model_and_tokenizer, builtin_tools=True) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30), s


def ask(client, question: str, **kw):
    kw = {"temperature": 0, "max_tokens": 120, **kw}
    return client[0].chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **kw)


def test_a_call_comes_back_as_tool_calls_with_its_arguments_as_a_json_string(client):
    r = ask(client, "Weather in Kesh?", tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Kesh"}
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_the_tool_result_goes_back_in_and_the_model_answers(client):
    first = ask(client, "Weather in Kesh?", tools=[WEATHER]).choices[0].message
    messages = [{"role": "user", "content": "Weather in Kesh?"}, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny"}]
    r = client[0].chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], temperature=0,
                                          max_tokens=60)
    assert r.choices[0].message.content == "Sunny in Kesh." and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls


def test_parallel_calls_and_parallel_tool_calls_false(client):
    calls = ask(client, "Weather in Kesh and Mira?", tools=[WEATHER]).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Kesh", "Mira"]
    assert len({c.id for c in calls}) == 2
    one = ask(client, "Weather in Kesh and Mira?", tools=[WEATHER], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"


def test_a_stream_sends_index_id_and_name_once_then_argument_fragments(client):
    whole = ask(client, "Weather in Kesh and Mira?", tools=[WEATHER]).choices[0].message.tool_calls
    stream = ask(client, "Weather in Kesh and Mira?", tools=[WEATHER], stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index not in calls, "id and name come once"
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(w.function.name, w.function.arguments)
                                                                      for w in whole]


def test_tool_choice_none_bans_calls(client):
    r = ask(client, "Weather in Kesh?", tools=[WEATHER], tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


def test_an_answer_without_a_call_is_plain_content(client):
    r = ask(client, "Hello", tools=[WEATHER])
    assert r.choices[0].message.content == "Hi there." and not r.choices[0].message.tool_calls


def test_legacy_functions_map_onto_the_same_path(client):
    r = ask(client, "Weather in Kesh?", functions=[WEATHER["function"]])
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "function_call"
    assert message.function_call.name == "get_weather"
    assert json.loads(message.function_call.arguments) == {"city": "Kesh"}


def test_a_legacy_function_result_goes_back_in(client):
    messages = [{"role": "user", "content": "Weather in Kesh?"},
                {"role": "assistant", "content": None,
                 "function_call": {"name": "get_weather", "arguments": '{"city": "Kesh"}'}},
                {"role": "function", "name": "get_weather", "content": "sunny"}]
    r = client[0].chat.completions.create(model="tiny", messages=messages, functions=[WEATHER["function"]],
                                          temperature=0, max_tokens=60)
    assert r.choices[0].message.content == "Sunny in Kesh."


def test_legacy_functions_stream_function_call_deltas(client):
    name, arguments, finish = None, "", None
    for chunk in ask(client, "Weather in Kesh?", functions=[WEATHER["function"]], stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            assert not choice.delta.tool_calls
            if choice.delta.function_call is not None:
                name = choice.delta.function_call.name or name
                arguments += choice.delta.function_call.arguments or ""
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Kesh"}, "function_call")


def test_a_forced_call_cut_by_max_tokens_still_comes_back_whole(client):
    jsonschema = pytest.importorskip("jsonschema")
    whole = ask(client, "Hello", tools=[WEATHER], tool_choice="required", temperature=0)
    # a budget that ends on the call's last token: no room for <|end|>; the grammar closed the JSON in time
    r = ask(client, "Hello", tools=[WEATHER], tool_choice="required", temperature=0,
            max_tokens=whole.usage.completion_tokens - 1)
    assert r.choices[0].finish_reason == "length"
    (call,) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_builtin_tools_run_on_the_server_and_show_with_their_results(builtin_client, client):
    r = ask(builtin_client, "What is 12*7?", tools=[WEATHER])
    message = r.choices[0].message
    assert message.content == "It is 84." and not message.tool_calls and r.choices[0].finish_reason == "stop"
    (turn,) = message.model_extra["tool_results"]
    assert turn["function"]["name"] == "calculator" and turn["content"] == "84" and turn["ok"]
    # the result's tokens were read by the model: they count as prompt tokens
    alone = ask(builtin_client, "Hello", tools=[WEATHER], max_tokens=1).usage.prompt_tokens
    assert r.usage.prompt_tokens > alone
    # streamed: the built-in call is not sent as a tool call; its result comes as a delta
    chunks = list(ask(builtin_client, "What is 12*7?", tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.tool_calls for d in deltas)
    assert [t["content"] for d in deltas for t in (d.model_extra or {}).get("tool_results", [])] == ["84"]
    assert "".join(d.content or "" for d in deltas) == "It is 84."


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
    ({"tools": [WEATHER], "messages": [{"role": "user", "content": "x"},
                                       {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}]},
     "messages[1].tool_call_id"),
    ({"functions": [WEATHER["function"]], "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_time", "content": "noon"}]}, "messages[2].name"),
])
def test_bad_tool_input_is_a_400_naming_the_field(client, body, param):
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Kesh?"}], **body}
    r = httpx.post(client[1].url + "/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_builtin_name_cannot_be_declared_again(builtin_client):
    tool = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    r = httpx.post(builtin_client[1].url + "/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_langchain_bind_tools_gets_the_call(client):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="tiny", base_url=client[1].url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=120, max_retries=0)
    reply = llm.bind_tools([WEATHER]).invoke("Weather in Kesh?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Kesh"})]


# ---- structured output: answers that parse whatever the model ----------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_call_parses_and_matches_its_schema_even_where_the_model_would_not_call(client, choice):
    jsonschema = pytest.importorskip("jsonschema")
    for question in ("Hello", "What is 12*7?"):  # the model answers these in words (or not at all) unforced
        r = ask(client, question, tools=[WEATHER], tool_choice=choice, temperature=1.0, seed=3)
        (tc,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and tc.function.name == "get_weather"
        jsonschema.validate(json.loads(tc.function.arguments), WEATHER["function"]["parameters"])
    streamed = ask(client, "Hello", tools=[WEATHER], tool_choice=choice, stream=True)
    names = [d.function.name for c in streamed for d in (c.choices[0].delta.tool_calls or []) if c.choices and d.id]
    assert names == ["get_weather"]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Kesh", "Mira"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_response_format_json_schema_and_json_object_always_parse(client, seed):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
    r = ask(client, "Weather in Kesh?", response_format=fmt, temperature=1.0, seed=seed)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = ask(client, "Hello", response_format={"type": "json_object"}, temperature=1.0, seed=seed)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_structured_output_errors_name_the_field(client):
    def post(**body):
        payload = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body}
        return httpx.post(client[1].url + "/v1/chat/completions", json=payload, timeout=30)

    r = post(response_format={"type": "json_schema", "json_schema": {"name": "bad name", "schema": SCHEMA}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.name"
    r = post(response_format={"type": "xml"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type"
    r = post(response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": SCHEMA}}, max_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_tokenize_counts_a_chat_with_tools_as_the_chat_endpoint_does(builtin_client):
    messages = [{"role": "user", "content": "Hello"}]
    r = httpx.post(builtin_client[1].url + "/tokenize", json={"messages": messages, "tools": [WEATHER]}, timeout=30)
    usage = ask(builtin_client, "Hello", tools=[WEATHER], max_tokens=1).usage
    assert r.json()["count"] == usage.prompt_tokens
