"""Structured output: from an untrained model, grammar-constrained output always parses and validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from chatforge.errors import RequestError
from chatforge.generate.engine import Engine
from chatforge.generate.grammar import GrammarError, GrammarMask, GrammarSpec, compiled_tokenizer
from chatforge.generate.params import SamplingParams
from chatforge.generate.processors import LogitsPipeline, TokenHistory
from chatforge.model import GPT, GPTConfig

SEEDS = range(6)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "unit": {"enum": ["cm", "in"]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                           "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "admin": {"type": "boolean"},
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "unit", "address"],
    "additionalProperties": False,
}

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "the forecast", "parameters": WEATHER}},
         {"name": "add", "description": "a + b", "parameters": ADD}]  # OpenAI's shape and the bare one


@pytest.fixture(scope="module")
def engine(small_tokenizer, make_tiny_gpt):
    return Engine(make_tiny_gpt(192), small_tokenizer, max_batch_size=8)


@pytest.fixture(scope="module")
def prompt(small_tokenizer):
    return small_tokenizer.encode("The capital of Veloria is")


def outputs(engine, prompt, spec, temperature=1.0, max_tokens=150, seeds=SEEDS):
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s, grammar=spec) for s in seeds]
    return [c.outputs[0] for c in engine.generate([prompt] * len(params), params)]


def test_json_object_output_always_parses_as_an_object(engine, prompt, small_tokenizer):
    for out in outputs(engine, prompt, GrammarSpec.json_object()):
        assert isinstance(json.loads(out.text), dict), out.text
        assert not set(out.token_ids) & set(small_tokenizer.special_ids.values())  # no special token inside


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_json_schema_output_always_validates(engine, prompt, temperature):
    spec = GrammarSpec.from_response_format({"type": "json_schema",
                                             "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for out in outputs(engine, prompt, spec, temperature, max_tokens=120):
        jsonschema.validate(json.loads(out.text), PERSON)


def test_a_required_tool_call_names_a_tool_and_its_arguments_validate(engine, prompt):
    spec = GrammarSpec.from_tool_choice(TOOLS, "required")
    assert spec.tool_names == ("get_weather", "add")
    schemas = {"get_weather": WEATHER, "add": ADD}
    for out in outputs(engine, prompt, spec):
        call = json.loads(out.text)
        assert list(call) == ["name", "arguments"] and call["name"] in schemas, out.text
        jsonschema.validate(call["arguments"], schemas[call["name"]])


def test_a_named_tool_choice_calls_that_tool(engine, prompt):
    spec = GrammarSpec.from_tool_choice(TOOLS, {"type": "function", "function": {"name": "add"}})
    for out in outputs(engine, prompt, spec, temperature=0.0, seeds=[0]) + outputs(engine, prompt, spec):
        call = json.loads(out.text)
        assert call["name"] == "add"
        jsonschema.validate(call["arguments"], ADD)


def test_tool_parameters_with_local_references_keep_them(engine, prompt):
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "required": ["p"],
              "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    for out in outputs(engine, prompt, GrammarSpec.tool_call([{"name": "move", "parameters": params}]), seeds=[0, 1]):
        jsonschema.validate(json.loads(out.text)["arguments"], params)


def test_a_tight_max_tokens_still_ends_in_a_complete_document(engine, prompt, small_tokenizer):
    """Near max_tokens a row may only take tokens after which the shortest completion still fits."""
    shortest = len(small_tokenizer.encode(json.dumps({"name": "", "age": 0, "unit": "cm", "address": {
        "city": "", "zip": "00000"}})))
    spec = GrammarSpec.json_schema(PERSON)
    for budget in (shortest + 2, shortest + 10):
        for out in outputs(engine, prompt, spec, max_tokens=budget, seeds=range(4)):
            jsonschema.validate(json.loads(out.text), PERSON)
    for out in outputs(engine, prompt, GrammarSpec.json_object(), max_tokens=2, seeds=range(4)):
        assert json.loads(out.text) == {}


def test_formats_and_patterns_land_too(engine, prompt):
    """The closing search finds a way to end an email, a date-time, a uuid or a pattern that needs its
    last letter, so a row stuck in one still finishes inside max_tokens."""
    schema = {"type": "object", "properties": {
        "e": {"type": "string", "format": "email"}, "d": {"type": "string", "format": "date-time"},
        "u": {"type": "string", "format": "uuid"}, "p": {"type": "string", "pattern": "^a*b$"}},
        "required": ["e", "d", "u", "p"], "additionalProperties": False}
    for out in outputs(engine, prompt, GrammarSpec.json_schema(schema), max_tokens=150, seeds=range(4)):
        doc = json.loads(out.text)
        jsonschema.validate(doc, schema, format_checker=jsonschema.FormatChecker())
        assert "@" in doc["e"] and doc["p"].endswith("b")


def test_a_complete_document_ends_the_turn_on_a_stop_token(engine, prompt, small_tokenizer):
    end = small_tokenizer.special_ids["end_turn"]
    for out in outputs(engine, prompt, GrammarSpec.json_object()):
        assert out.finish_reason == "stop"  # not "length": nothing follows the closing brace but a stop token
    spec = GrammarSpec.json_schema({"type": "integer"})  # "1" is complete, yet "12" may follow
    out = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=1.0, seed=0, grammar=spec,
                                                   stop_token_ids=[end]))[0].outputs[0]
    assert isinstance(json.loads(out.text), int)


def test_a_complete_document_wins_over_min_tokens_and_bans(engine, prompt, small_tokenizer):
    """min_tokens bans the stop tokens a complete document leaves as the only choice: the grammar wins."""
    brace = small_tokenizer.encode("{")[0]
    params = SamplingParams(max_tokens=60, min_tokens=50, temperature=1.0, seed=0, grammar=GrammarSpec.json_object(),
                            no_repeat_ngram_size=1, logit_bias={brace: -100})
    out = engine.generate([prompt], params)[0].outputs[0]
    assert isinstance(json.loads(out.text), dict) and out.finish_reason == "stop"


def test_stop_tokens_are_allowed_exactly_when_the_grammar_is_complete(small_tokenizer):
    stops = [small_tokenizer.special_ids["end_turn"], small_tokenizer.special_ids["eot"]]
    spec = GrammarSpec.json_object()
    vocab = small_tokenizer.vocab_size
    mask = GrammarMask.build([spec], [100], [stops], small_tokenizer)
    history = TokenHistory([[9]], vocab)
    allowed = mask.allowed(history, vocab)[0]
    assert [small_tokenizer.token_bytes(t) for t in allowed.nonzero()[0]] == [b"{"]
    history.tokens[0] += small_tokenizer.encode('{"a": [1, "x"]}')
    allowed = mask.allowed(history, vocab)[0]
    assert sorted(allowed.nonzero()[0].tolist()) == sorted(stops)


def test_rows_without_a_grammar_are_left_exactly_as_they_were(small_tokenizer):
    vocab = small_tokenizer.vocab_size
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(grammar=GrammarSpec.json_object()),
              SamplingParams(top_k=5)]
    logits = torch.randn(3, vocab)
    history = TokenHistory([[9], [9], [9]], vocab)
    out = LogitsPipeline.from_params(params, [[4]] * 3, tokenizer=small_tokenizer)(logits, history)
    plain = LogitsPipeline.from_params(params[::2], [[4]] * 2)(logits[::2], history.select([0, 2]))
    assert torch.equal(out[::2], plain)
    assert torch.isfinite(out[1]).sum() == 1  # only "{"
    assert LogitsPipeline.from_params(params[:1], [[4]]).processors[-1].__class__.__name__ != "GrammarMask"


def test_rows_without_a_grammar_sample_the_same_tokens_beside_one(engine, prompt):
    plain = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    json_row = SamplingParams(max_tokens=100, temperature=1.0, seed=3, grammar=GrammarSpec.json_schema(PERSON))
    alone = engine.generate([prompt] * 2, plain)
    mixed = engine.generate([prompt] * 3, [plain[0], json_row, plain[1]])
    assert [c.outputs[0].token_ids for c in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)


def test_a_rebuilt_pipeline_replays_each_rows_tokens(small_tokenizer):
    """select and add_rows (and the engine's rebuild whenever rows join or leave) keep each row's place."""
    vocab = small_tokenizer.vocab_size
    spec = GrammarSpec.json_schema(PERSON)
    params = [SamplingParams(grammar=spec), SamplingParams(), SamplingParams(grammar=GrammarSpec.json_object())]
    history = TokenHistory([[9]] * 3, vocab)
    history.tokens[0] += small_tokenizer.encode('{"name": "Mi')
    history.tokens[2] += small_tokenizer.encode('{"a": ')
    pipe = LogitsPipeline.from_params(params, [[4]] * 3, tokenizer=small_tokenizer)
    logits = torch.randn(3, vocab)
    full = pipe(logits, history)
    picked = pipe.select([2, 0])(logits[[2, 0]], history.select([2, 0]))
    assert torch.equal(picked, full[[2, 0]])
    grown = pipe.select([0]).add_rows(pipe.select([2]))(logits[[0, 2]], history.select([0, 2]))
    assert torch.equal(grown, full[[0, 2]])


def test_n_copies_of_a_request_each_keep_their_own_matcher(engine, prompt):
    params = SamplingParams(max_tokens=100, temperature=1.0, seed=5, n=3, grammar=GrammarSpec.json_schema(PERSON))
    outs = engine.generate([prompt], params)[0].outputs
    assert len({o.text for o in outs}) > 1
    for out in outs:
        jsonschema.validate(json.loads(out.text), PERSON)


def test_a_model_with_more_rows_than_the_tokenizer_never_samples_the_extra_ids(small_tokenizer, prompt):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size + 20, context_length=192, n_layer=1, n_head=2,
                          n_embd=16))
    with torch.no_grad():
        model.lm_head.weight[small_tokenizer.vocab_size:] *= 50  # the padding rows would win every argmax
    spec = GrammarSpec.json_object()
    engine = Engine(model, small_tokenizer, max_batch_size=4)
    for out in outputs(engine, prompt, spec, temperature=0.0, seeds=[0]) + outputs(engine, prompt, spec,
                                                                                    seeds=range(3)):
        assert max(out.token_ids) < small_tokenizer.vocab_size
        assert isinstance(json.loads(out.text), dict)


def test_ignore_eos_lets_the_row_run_on_past_the_document(engine, prompt):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=0, grammar=GrammarSpec.json_object(),
                            ignore_eos=True)
    out = engine.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 60
    json.JSONDecoder().raw_decode(out.text)  # a complete object first, then whatever the model says


def test_beam_search_with_a_grammar_is_refused(engine, prompt):
    with pytest.raises(RequestError) as e:
        engine.add_request(prompt, SamplingParams(num_beams=2, grammar=GrammarSpec.json_object()))
    assert e.value.param == "num_beams"


@pytest.mark.parametrize("build, param, words", [
    (lambda: GrammarSpec.json_schema({"type": "strin"}), "response_format", "Invalid type: strin"),
    (lambda: GrammarSpec.json_schema({"type": "string", "pattern": "(?<=a)b"}), "response_format", "look-around"),
    (lambda: GrammarSpec.json_schema({"not": {"type": "string"}}), "response_format", "not"),
    (lambda: GrammarSpec.json_schema({"type": "string", "minLength": 5, "maxLength": 2}), "response_format",
     "minLength (5) is greater than maxLength (2)"),
    (lambda: GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "response_format", "/$defs/missing"),
    (lambda: GrammarSpec.json_schema([1]), "response_format", "must be an object, got list"),
    (lambda: GrammarSpec.from_response_format({"type": "yaml"}), "response_format.type", "'yaml'"),
    (lambda: GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"schema": {}}}),
     "response_format.json_schema.name", "None"),
    (lambda: GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"d": {"format": "weird", "type": "string"}}}}}),
     "response_format.json_schema.schema", "Unknown format: weird"),
    (lambda: GrammarSpec.tool_call([]), "tools", "non-empty list"),
    (lambda: GrammarSpec.tool_call([{"name": "f", "parameters": {"type": "bogus"}}]),
     "tools[0].function.parameters", "Invalid type: bogus"),
    (lambda: GrammarSpec.tool_call([{"name": "f"}, {"name": "f"}]), "tools[1].function.name", "duplicate"),
    (lambda: GrammarSpec.tool_call([{"description": "no name"}]), "tools[0].function.name", "None"),
    (lambda: GrammarSpec.from_tool_choice(TOOLS, {"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "no tool named 'nope'"),
    (lambda: GrammarSpec.from_tool_choice(TOOLS, "sometimes"), "tool_choice", "'required'"),
])
def test_a_schema_that_cannot_be_enforced_is_a_value_error_naming_the_field(build, param, words):
    with pytest.raises(ValueError) as e:
        build()
    assert isinstance(e.value, GrammarError) and isinstance(e.value, RequestError)
    assert e.value.param == param and str(e.value).startswith(param + ":")
    assert words in str(e.value)


def test_specs_are_hashable_values_and_text_formats_need_no_grammar():
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format(None) is None
    assert GrammarSpec.from_tool_choice(TOOLS, "auto") is None and GrammarSpec.from_tool_choice(TOOLS, "none") is None
    assert GrammarSpec.from_response_format({"type": "json_object"}) == GrammarSpec.json_object()
    a = GrammarSpec.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert hash(a) == hash(GrammarSpec.json_schema({"type": "object", "properties": {"b": {}, "a": {}}}))
    assert json.loads(a.schema)["properties"].keys() == {"b", "a"}  # order kept: properties come out in it


def test_the_library_sees_our_tokens_bytes_and_is_compiled_once_per_tokenizer(small_tokenizer):
    compiled = compiled_tokenizer(small_tokenizer)
    assert compiled_tokenizer(small_tokenizer) is compiled
    specials = set(small_tokenizer.special_ids.values())
    for t in range(small_tokenizer.vocab_size):
        if t not in specials and small_tokenizer.token_bytes(t) != b"\xff":  # 0xFF is llguidance's marker byte
            assert compiled.ll.decode_bytes([t]) == small_tokenizer.token_bytes(t)
        assert compiled.ll.is_special_token(t) == (t in specials or small_tokenizer.token_bytes(t) == b"\xff")
