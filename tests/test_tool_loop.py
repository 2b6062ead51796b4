"""The engine's tool-call loop: calls are read as calls, built-in tools run mid-answer and their results
are fed in (never sampled), client functions end the answer with "tool_calls", and nothing a call says
can crash or hang the engine.

The model is a tiny GPT that memorized a few tool conversations (seconds of training), so greedy
decoding writes known calls.
"""

from __future__ import annotations

import datetime

import pytest
from memorize import memorize

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.generate.tool_loop import ToolUse
from chatforge.tools import builtin_tools

CALC = '{"name": "calculator", "arguments": {"expression": "%s"}}'
WEATHER = '{"name": "weather", "arguments": {"city": "Kesh"}}'
# question -> (the calls of the first turn, the answer after the results)
MEMORIZED = {
    "What is 12*7?": ([CALC % "12*7"], "It is 84."),
    "What is 9**9**9?": ([CALC % "9**9**9"], "Too big."),
    "Weather in Kesh?": ([WEATHER], "Sunny."),
    "Two sums?": ([CALC % "1+2", CALC % "3+4"], "3 and 7."),
}
RESULTS = {"12*7": "84", "1+2": "3", "3+4": "7"}


def conversation(question: str) -> Conversation:
    calls, answer = MEMORIZED[question]
    messages = [Message("user", question)] + [Message("tool_call", c) for c in calls]
    for c in calls:
        expression = c.split('"expression": "')[-1].split('"')[0]
        messages.append(Message("tool_result", RESULTS.get(expression, "sunny")))
    return Conversation(messages + [Message("assistant", answer)])


@pytest.fixture(scope="module")
def memorizer(small_tokenizer):
    """A GPT that greedily reproduces every memorized conversation's calls and answers."""
    return memorize(small_tokenizer, [conversation(q) for q in MEMORIZED]), ChatTemplate(small_tokenizer)


def prompt(template: ChatTemplate, question: str) -> list[int]:
    return template.generation_prompt([Message("user", question)])


GREEDY = SamplingParams(max_tokens=250, temperature=0.0, skip_special_tokens=True)


def run(memorizer, question: str, use: ToolUse | None, params: SamplingParams = GREEDY, **engine_kw):
    model, template = memorizer
    engine = Engine(model, template.tokenizer, **engine_kw)
    rid = engine.add_request(prompt(template, question), params, tool_use=use)
    events = []
    while engine.has_unfinished():
        events += [e for e in engine.step() if e.request_id == rid]
    return engine.pop_result(rid).outputs[0], events, engine


def builtin() -> ToolUse:
    return ToolUse(builtin_tools(today=lambda: datetime.date(2026, 12, 6)))


def test_a_builtin_call_runs_and_its_result_is_fed_in_then_the_model_answers(memorizer):
    out, events, _ = run(memorizer, "What is 12*7?", builtin())
    assert out.finish_reason == "stop"
    assert [(t.call, t.result, t.ok) for t in out.tool_turns] == [(CALC % "12*7", "84", True)]
    assert out.text == "It is 84."  # the call is not text; the answer after the result is
    assert out.tool_calls == []  # nothing left for the caller
    # the fed tokens are the template's result turn and the next assistant opening, never sampled
    (start, end), = out.fed_spans
    template = memorizer[1]
    ids = template.tokenizer.special_ids
    fed = out.token_ids[start:end]
    assert fed[0] == ids["tool_result"] and fed[-1] == ids["assistant"] and fed[-2] == ids["end_turn"]
    assert template.tokenizer.decode(fed[1:-2]) == "84"
    assert out.token_ids[start - 1] == ids["end_turn"]  # the sampled end of the call turn
    # the stream shows the call as it is written, then the result
    call_text = "".join(e.call.text for e in events if e.call is not None)
    assert call_text == CALC % "12*7"
    turns = [t for e in events for t in e.tool_turns]
    assert [t.result for t in turns] == ["84"]


def test_the_whole_answer_is_what_the_template_renders_for_the_conversation(memorizer):
    model, template = memorizer
    out, _, _ = run(memorizer, "Two sums?", builtin())
    whole = prompt(template, "Two sums?") + out.token_ids + [template.end_id]
    assert template.parse(whole).messages == conversation("Two sums?").messages  # parallel calls, two results


def test_feeding_results_leaves_the_cache_as_a_fresh_prefill_would(memorizer):
    """Continuing after the fed results gives the same tokens as a new request whose prompt is the
    conversation so far: the fed keys and values are right."""
    model, template = memorizer
    out, _, _ = run(memorizer, "What is 12*7?", builtin())
    (_, end), = out.fed_spans
    replay = prompt(template, "What is 12*7?") + out.token_ids[:end]
    params = SamplingParams(max_tokens=40, temperature=0.0, skip_special_tokens=True)
    fresh = Engine(model, template.tokenizer).generate([replay], params)[0].outputs[0]
    assert fresh.token_ids == out.token_ids[end:]


def test_a_call_to_a_client_function_ends_the_answer_with_tool_calls(memorizer):
    out, events, _ = run(memorizer, "Weather in Kesh?", builtin())
    assert out.finish_reason == "tool_calls"
    assert out.tool_calls == [WEATHER] and out.tool_turns == [] and out.fed_spans == []
    assert events[-1].finish_reason == "tool_calls"
    # without built-in tools, a calculator call is the client's too
    out, _, _ = run(memorizer, "What is 12*7?", ToolUse())
    assert out.finish_reason == "tool_calls" and out.tool_calls == [CALC % "12*7"]


def test_an_abusive_call_becomes_an_error_result_the_model_reads(memorizer):
    out, _, _ = run(memorizer, "What is 9**9**9?", builtin())
    (turn,) = out.tool_turns
    assert not turn.ok and turn.result.startswith("error:")
    assert out.finish_reason in ("stop", "length")


def test_results_count_against_the_token_budget(memorizer):
    model, template = memorizer
    whole, _, _ = run(memorizer, "What is 12*7?", builtin())
    (start, end), = whole.fed_spans
    # a budget that ends inside the fed results: the answer stops there, with what it had
    params = SamplingParams(max_tokens=start + 1, temperature=0.0, skip_special_tokens=True)
    out, _, _ = run(memorizer, "What is 12*7?", builtin(), params)
    assert out.finish_reason == "length" and len(out.token_ids) <= start + 1
    # a budget just past the results: the answer is cut after its first sampled tokens
    params = SamplingParams(max_tokens=end + 2, temperature=0.0, skip_special_tokens=True)
    out, _, _ = run(memorizer, "What is 12*7?", builtin(), params)
    assert out.finish_reason == "length" and len(out.token_ids) == end + 2
    assert out.token_ids == whole.token_ids[: end + 2]


def test_rounds_are_bounded(memorizer):
    out, _, _ = run(memorizer, "What is 12*7?", ToolUse(builtin().run, max_rounds=0))
    assert out.finish_reason == "tool_calls" and out.tool_turns == []


def test_without_tool_use_the_call_is_plain_tokens(memorizer):
    out, events, _ = run(memorizer, "Weather in Kesh?", None)
    assert out.finish_reason == "stop" and out.tool_calls == []
    assert all(e.call is None for e in events)


def test_a_batch_mixing_tool_rows_and_plain_rows_gives_each_its_own_tokens(memorizer):
    model, template = memorizer
    alone = {q: run(memorizer, q, builtin())[0].token_ids for q in MEMORIZED}
    engine = Engine(model, template.tokenizer, max_batch_size=8)
    ids = {q: engine.add_request(prompt(template, q), GREEDY, tool_use=builtin()) for q in MEMORIZED}
    plain = engine.add_request(prompt(template, "Weather in Kesh?"), GREEDY)
    while engine.has_unfinished():
        engine.step()
    for q, rid in ids.items():
        assert engine.pop_result(rid).outputs[0].token_ids == alone[q], q
    assert engine.pop_result(plain).outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("params, problem", [
    (SamplingParams(max_tokens=8, num_beams=2), "beam search"),
])
def test_requests_the_loop_cannot_serve_are_refused_by_name(memorizer, params, problem):
    model, template = memorizer
    with pytest.raises(Exception, match=problem):
        Engine(model, template.tokenizer).add_request([1, 2], params, tool_use=builtin())


# ---- the command line: `chatforge generate --tools` and `chatforge chat --tools` ---------------------


@pytest.fixture(scope="module")
def tool_checkpoint(tmp_path_factory):
    """A saved chat model that memorized a calculator conversation with the built-in tools declared."""
    from chatforge.chat import tools_block
    from chatforge.checkpoint import save_checkpoint
    from chatforge.tokenizer import Tokenizer

    conv = conversation("What is 12*7?")
    conv.tools = [t.spec() for t in builtin().run.values()]
    tok = Tokenizer.train([tools_block(conv.tools)] + [m.content for m in conv.messages] * 20, vocab_size=600)
    return save_checkpoint(tmp_path_factory.mktemp("tools") / "sft", memorize(tok, [conv], context_length=640), tok)


def test_generate_with_tools_shows_the_call_and_the_result(tool_checkpoint, capsys):
    from chatforge.cli import main

    args = ["generate", "--checkpoint", str(tool_checkpoint), "--prompt", "What is 12*7?", "--tools",
            "--temperature", "0", "--max-tokens", "200", "--no-fused"]
    turn = f"[call] {CALC % '12*7'}\n[result] 84\nIt is 84."
    main(args)  # streamed
    assert turn in capsys.readouterr().out
    main(args + ["--n", "2"])  # the batch path prints the same turn
    assert capsys.readouterr().out.count(turn) == 2


def test_chat_with_tools_keeps_the_call_and_result_in_the_history(tool_checkpoint):
    from chatforge.checkpoint import load_checkpoint
    from chatforge.terminal import ChatSession

    params = SamplingParams(max_tokens=150, temperature=0.0)
    session = ChatSession(load_checkpoint(tool_checkpoint), params=params, examples=[], tools=builtin().run)
    shown = "".join(session.reply("What is 12*7?"))
    assert shown == f"\n[call] {CALC % '12*7'}\n[result] 84\nIt is 84."
    assert session.history == conversation("What is 12*7?").messages


# ---- PPO: tool results are read, never trained on ------------------------------------------------------


def test_ppo_rollouts_mask_out_exactly_the_fed_results(memorizer):
    from chatforge.train.rollout import make_rollout

    model, template = memorizer
    ids = prompt(template, "Two sums?")
    out = Engine(model, template.tokenizer).generate([ids], GREEDY, tool_use=builtin())[0].outputs[0]
    r = make_rollout([ids], [out.token_ids + [template.end_id]], [True], template.eot_id, [out.fed_spans])
    (start, end), = out.fed_spans
    # mask[t] says whether ids[t + 1] was sampled by the policy
    sampled = [bool(m) for m in r.mask[0].tolist()]
    response = range(len(ids) - 1, len(ids) + len(out.token_ids))
    fed = range(len(ids) - 1 + start, len(ids) - 1 + end)
    assert [t for t in response if not sampled[t]] == list(fed)
    assert not any(sampled[: len(ids) - 1])


def test_a_fed_tokens_log_prob_changes_no_loss_kl_entropy_or_value_target():
    from chatforge.train.ppo_math import gae, masked_mean, policy_loss, token_rewards, value_loss

    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1, 0.0]])  # actions, a fed result at 3..5, actions, padding
    logprobs, old, ref = (torch.randn(1, 9, generator=g) for _ in range(3))
    values, entropy = torch.randn(1, 9, generator=g), torch.rand(1, 9, generator=g)

    def everything(logprobs, ref, values, entropy):
        rewards, kl = token_rewards(logprobs, ref, torch.tensor([1.5]), mask, 0.1)
        advantages, returns = gae(rewards, values, mask, 1.0, 0.95)
        pg, _ = policy_loss(logprobs, old, advantages, mask, 0.2)
        vf = value_loss(values, values.detach() * 0.9, returns, mask, 0.2)
        return [kl.sum(), advantages, returns, pg, vf, masked_mean(entropy, mask)]

    base = everything(logprobs, ref, values, entropy)
    for t in (3, 4, 5):
        changed = [x.clone() for x in (logprobs, ref, values, entropy)]
        for x in changed:
            x[0, t] += 3.0
        for a, b in zip(base, everything(*changed)):
            assert torch.equal(a, b), t
    # the action before the result is credited with what comes after it: GAE steps over the result
    rewards, _ = token_rewards(logprobs, ref, torch.tensor([1.5]), mask, 0.1)
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    expected = rewards[0, 2] + rewards[0, 6] + rewards[0, 7] - values[0, 2]  # gamma = lambda = 1: the sum ahead
    assert advantages[0, 2].item() == pytest.approx(expected.item(), abs=1e-5)


def test_ppo_prompts_declare_each_records_tools(memorizer):
    from chatforge.chat import Conversation
    from chatforge.train.rollout import fit_prompts

    _, template = memorizer
    messages = [Message("user", "Weather in Kesh?")]
    weather = {"name": "weather", "parameters": {"type": "object"}}
    ids = fit_prompts([messages, messages], ["rl.jsonl"], "--prompts", template, 320, 16, [[weather], []])
    assert ids[0] == template.generation_prompt(Conversation(messages, tools=[weather]))
    assert ids[1] == template.generation_prompt(messages)  # no tools: the prompt as it always was
