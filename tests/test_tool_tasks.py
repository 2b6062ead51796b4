"""The task world's tool families (calc, dates, functions): off by default, their records read back
through the readers, the scorer judges whole transcripts (the calls and the answer after them), the
labeler prefers a right call, and evaluation runs the tools for a model that calls them.

Hand-made transcripts check the scorer, so a scorer that only agreed with the generator's
bookkeeping would still be caught.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from chatforge.chat import Conversation, Message, tool_call_content
from chatforge.data.chat_readers import read_conversations, read_preferences, read_prompts
from chatforge.data.tasks import (
    FAMILIES,
    PAD_PENALTY,
    SPLITS,
    TOOL_FAMILIES,
    Labeler,
    Scorer,
    TaskConfig,
    build_tasks,
    final_text,
    task_tools,
    write_tasks,
)
from chatforge.data.tasks.calls import builtin_specs, function_spec
from chatforge.data.world import World
from chatforge.errors import ConfigError

SMALL = TaskConfig(sft_train=600, sft_val=60, prefs_train=150, prefs_val=30, rl_train=90, rl_val=30,
                   eval_per_family=8, arithmetic_items_per_op=200).with_tools()
FILES = ("sft_train", "sft_val", "prefs_train", "prefs_val", "rl_train", "rl_val", "eval")


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(seed=0)


@pytest.fixture(scope="module")
def tasks(world):
    return build_tasks(world, seed=0, config=SMALL)


@pytest.fixture(scope="module")
def scorer(world) -> Scorer:
    return Scorer(world, today="2026-03-14")


def call(name: str, **arguments) -> Message:
    return Message("tool_call", tool_call_content(name, arguments))


def transcript(name: str, arguments: dict, result: str, answer: str) -> tuple[Message, ...]:
    return (call(name, **arguments), Message("tool_result", result), Message("assistant", answer))


def calc(expression: str, result: str, answer: str) -> tuple[Message, ...]:
    return transcript("calculator", {"expression": expression}, result, answer)


# ---- switches ---------------------------------------------------------------------------------


def test_tool_families_are_off_by_default_and_on_with_tools(world, tasks):
    default = build_tasks(world, 0, replace(SMALL, mix=TaskConfig().mix))
    for name in FILES:
        assert {r.family for r in getattr(default, name)} == set(FAMILIES), name
    for name in ("sft_train", "prefs_train", "rl_train", "eval"):
        assert {r.family for r in getattr(tasks, name)} == set(FAMILIES + TOOL_FAMILIES), name
    assert Counter(t.family for t in tasks.eval) == dict.fromkeys(FAMILIES + TOOL_FAMILIES, 8)


def test_turning_tools_on_leaves_the_plain_families_eval_prompts_as_they_were(world, tasks):
    default = build_tasks(world, 0, replace(SMALL, mix=TaskConfig().mix))
    plain = [t for t in tasks.eval if t.family in FAMILIES]
    assert [(t.family, t.prompt) for t in plain] == [(t.family, t.prompt) for t in default.eval]


def test_the_tool_settings_are_checked_and_recorded_only_when_used(tmp_path, world):
    with pytest.raises(ConfigError):
        TaskConfig(max_functions=5)
    with pytest.raises(ConfigError):
        TaskConfig(today="14 March 2026")
    with pytest.raises(ConfigError):
        TaskConfig(unaided_share=2)
    tiny = TaskConfig().scaled(0.02)
    plain = json.loads(write_tasks(tmp_path / "a", world, config=tiny)["tasks"].read_text())
    tools = json.loads(write_tasks(tmp_path / "b", world, config=tiny.with_tools())["tasks"].read_text())
    assert "calc" not in plain["config"]["mix"] and "declare_builtin_tools" not in plain["config"]
    assert plain["families"] == list(FAMILIES) and set(plain["items"]["sft"]) == set(FAMILIES)
    assert tools["config"]["mix"]["calc"] == 0.15 and tools["config"]["today"] == "2026-03-14"
    assert tools["families"] == list(FAMILIES + TOOL_FAMILIES)


def test_builtin_tools_are_declared_unless_switched_off(world, tasks):
    builtin = [t["name"] for t in builtin_specs()]
    for task in tasks.rl_train + tasks.eval:
        if task.family in ("calc", "dates"):
            assert [t["name"] for t in task.tools] == builtin
        elif task.family == "functions":
            assert 1 <= len(task.tools) <= SMALL.max_functions
            assert all(t["name"].startswith("get_") and len(t["description"]) < 40 for t in task.tools)
        else:
            assert task.tools == ()
    bare = build_tasks(world, 0, replace(SMALL, declare_builtin_tools=False))
    assert all(t.tools == () for t in bare.eval if t.family in ("calc", "dates"))
    assert any(t.tools for t in bare.eval if t.family == "functions")  # world functions are always declared


# ---- records and files --------------------------------------------------------------------------


def test_files_read_back_with_their_tools_and_transcripts(tmp_path, world):
    paths = write_tasks(tmp_path, world, seed=0, config=SMALL)
    convs = read_conversations(paths["sft_train"])
    tool_turns = Counter()
    for conv, family in zip(convs.conversations, convs.families):
        assert bool(conv.tools) == (family in TOOL_FAMILIES), family
        tool_turns[family] += any(m.role == "tool_call" for m in conv.messages)
    assert set(tool_turns) == set(FAMILIES + TOOL_FAMILIES) and tool_turns["calc"] > 0
    assert all(tool_turns[f] == 0 for f in FAMILIES)
    prefs = read_preferences(paths["prefs_train"]).preferences
    tool_prefs = [p for p in prefs if p.family in TOOL_FAMILIES]
    assert tool_prefs and all(p.tools for p in tool_prefs) and not any(p.tools for p in prefs if p.family in FAMILIES)
    assert all(any(m.role == "tool_call" for m in p.responses[0]) for p in tool_prefs if p.family != "functions")
    for name in ("rl_train", "eval"):
        records = read_prompts(paths[name]).prompts
        assert all(bool(r.tools) == (r.family in TOOL_FAMILIES) for r in records)
    a = write_tasks(tmp_path / "again", world, seed=0, config=SMALL)
    for name in FILES:
        assert paths[name].read_bytes() == a[name].read_bytes(), name


def test_tool_records_come_from_their_split_and_share_no_prompt(tasks):
    split_of = {item.key: split for split, by_family in tasks.items.items()
                for items in by_family.values() for item in items}
    sources = {"sft_train": "sft", "prefs_train": "rm", "rl_train": "rl", "sft_val": "heldout",
               "prefs_val": "heldout", "rl_val": "heldout", "eval": "heldout"}
    prompts: dict[str, set] = {s: set() for s in SPLITS}
    for name, split in sources.items():
        for record in getattr(tasks, name):
            if record.family not in TOOL_FAMILIES:
                continue
            assert split_of[record.key] == split, (name, record.key)
            messages = record.messages if name.startswith("sft") else record.prompt
            question = next(m.content for m in messages if m.role == "user")
            prompts[split].add(question)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not prompts[a] & prompts[b], f"{a} and {b} share a prompt"


def test_demonstrations_have_the_configured_noise_and_score_as_labelled(tasks, scorer):
    demos = [d for d in tasks.sft_train if d.family in TOOL_FAMILIES]
    kinds = Counter(d.kind for d in demos)
    right = kinds["tool"] + kinds["unaided"]
    assert kinds["misused"] > 0 and kinds["wrong"] > 0
    assert abs((kinds["misused"] + kinds["wrong"]) / len(demos) - SMALL.wrong_share) < 0.02
    calc_dates = [d for d in demos if d.family != "functions" and d.correct]
    assert abs(sum(d.kind == "unaided" for d in calc_dates) / len(calc_dates) - SMALL.unaided_share) < 0.03
    assert right == sum(d.correct for d in demos)
    for demo in demos + [d for d in tasks.sft_val if d.family in TOOL_FAMILIES]:
        user = max(i for i, m in enumerate(demo.messages) if m.role == "user")
        prompt = Conversation(list(demo.messages[:user + 1]), list(demo.tools))
        score = scorer.score(prompt, demo.messages[user + 1:], demo.family)
        assert score.family == demo.family, demo
        expected = (1.0 if demo.style == "concise" else 1.0 - PAD_PENALTY) if demo.correct else 0.0
        assert score.value == expected, (demo, score)
        assert score.called == any(m.role == "tool_call" for m in demo.messages)


def test_rankings_put_the_right_call_first_and_agree_with_the_scorer(tasks, scorer):
    for ranking in tasks.prefs_train + tasks.prefs_val:
        if ranking.family not in TOOL_FAMILIES:
            continue
        prompt = Conversation(list(ranking.prompt), list(ranking.tools))
        scores = scorer.score_all(prompt, ranking.responses, ranking.family)
        values = [s.value for s in scores]
        assert values == sorted(values, reverse=True) and values[0] == 1.0, ranking
        assert len(set(ranking.responses)) == len(ranking.responses) >= SMALL.min_candidates - 2
        if scores[0].should_call is not False:  # a right call, unless no declared function fits
            assert scores[0].called and scores[0].call_correct, ranking


def test_every_tool_item_makes_a_task_whose_right_answer_scores_one_and_whose_misuses_score_zero(world, scorer):
    import random

    from chatforge.data.tasks import build_items
    from chatforge.data.tasks.families import _TaskMaker

    maker, rng = _TaskMaker(world, SMALL), random.Random(0)
    items = build_items(world, 0, SMALL)
    for split in SPLITS:
        for family in TOOL_FAMILIES:
            for item in items[split][family][:: 3 if family == "calc" else 1]:
                task = maker.make(item, rng)
                prompt = Conversation(list(task.prompt), list(task.tools))
                right, wrong, *misused = scorer.score_all(prompt, [task.answer, task.wrong, *task.misused], family)
                assert right.value == 1.0 and wrong.value == 0.0, task
                assert all(m.value == 0.0 and m.called for m in misused), task
                if task.unaided is not None:
                    unaided = scorer.score(prompt, task.unaided, family)
                    assert unaided.correct and unaided.called is False, task


# ---- the scorer on hand-made transcripts ------------------------------------------------------------


def test_calc_checks_the_expression_and_the_answer(scorer):
    q = "What is 12 times 7?"
    declared = Conversation([Message("user", q)], builtin_specs())
    assert scorer.score(declared, calc("12*7", "84", "12 times 7 is 84.")).value == 1.0
    assert scorer.score(declared, calc("7 * 12", "84", "It is 84.")).value == 1.0  # any equal expression
    wrong_call = scorer.score(declared, calc("12*8", "96", "12 times 7 is 84."))
    assert (wrong_call.value, wrong_call.correct, wrong_call.call_correct) == (0.0, True, False)
    contradicted = scorer.score(declared, calc("12*7", "84", "12 times 7 is 96."))
    assert (contradicted.value, contradicted.correct, contradicted.call_correct) == (0.0, False, True)
    unaided = scorer.score(declared, "12 times 7 is 84.")
    assert (unaided.family, unaided.value, unaided.called, unaided.call_correct) == ("calc", 1.0, False, None)
    # without a declaration the prompt text is arithmetic's; the record's label says calc
    assert scorer.score(q, "12 times 7 is 84.").family == "arithmetic"
    assert scorer.score(q, "12 times 7 is 84.", "calc").called is False
    assert scorer.score(q, "12 times 7 is 84.").called is None
    padded = scorer.score(declared, calc("12*7", "84", "Great question! 12 times 7 is 84."))
    assert padded.value == 1.0 - PAD_PENALTY and padded.padded
    stopped = scorer.score(declared, (call("calculator", expression="12*7"),))  # no answer after the call
    assert stopped.value == 0.0 and stopped.called


def test_dates_check_the_operation_the_dates_and_the_answer(scorer):
    weekday = "What day of the week is 2024-03-15?"
    right = transcript("calendar", {"operation": "weekday", "date": "2024-03-15"}, "Friday", "2024-03-15 is a Friday.")
    assert scorer.score(weekday, right).value == 1.0
    assert scorer.score("Which weekday is March 15, 2024?", right).value == 1.0
    day_off = transcript("calendar", {"operation": "weekday", "date": "2024-03-16"}, "Saturday",
                         "2024-03-15 is a Saturday.")
    assert scorer.score(weekday, day_off).value == 0.0
    assert scorer.score(weekday, "2024-03-15 is a Friday, or maybe a Monday.").value == 0.0
    days = "How many days are there from 2024-03-15 to 2024-04-29?"
    count = transcript("calendar", {"operation": "days_between", "start": "2024-03-15", "end": "2024-04-29"}, "45",
                       "There are 45 days from 2024-03-15 to 2024-04-29.")
    assert scorer.score(days, count).value == 1.0
    assert scorer.score(days, "There are 44 days from 2024-03-15 to 2024-04-29.").value == 0.0
    today = transcript("calendar", {"operation": "today"}, "2026-03-14", "Today is 2026-03-14.")
    assert scorer.score("What is today's date?", today).value == 1.0
    assert scorer.score("What is today's date?", "Today is March 14, 2026.").value == 1.0
    assert scorer.score("What is today's date?", "Today is 2026-03-15.").value == 0.0
    assert Scorer(scorer.world, today="2026-03-15").score("What is today's date?", today).value == 0.0


def test_functions_must_call_the_fitting_function_with_the_subject_or_none(world, scorer):
    country = world.entities_of("country")[0]
    other = world.entities_of("country")[1]
    capital = country.attributes["capital"]
    q = [Message("user", f"What is the capital of {country.name}?")]
    fits = Conversation(q, [function_spec("river"), function_spec("capital")])
    answer = f"The capital of {country.name} is {capital}."
    right = transcript("get_capital", {"country": country.name}, capital, answer)
    assert scorer.score(fits, right).value == 1.0 and scorer.score(fits, right).should_call is True
    from_memory = scorer.score(fits, answer)  # right, but the request asked for the function
    assert (from_memory.value, from_memory.correct, from_memory.called) == (0.0, True, False)
    wrong_subject = transcript("get_capital", {"country": other.name}, other.attributes["capital"], answer)
    assert scorer.score(fits, wrong_subject).call_correct is False
    wrong_function = transcript("get_river", {"country": country.name}, country.attributes["river"], answer)
    assert scorer.score(fits, wrong_function).value == 0.0
    none_fit = Conversation(q, [function_spec("river"), function_spec("age")])
    direct = scorer.score(none_fit, answer)
    assert (direct.family, direct.value, direct.called, direct.should_call) == ("functions", 1.0, False, False)
    assert scorer.score(none_fit, right).value == 0.0  # get_capital was not declared
    assert scorer.score(none_fit, wrong_function).value == 0.0  # a needless call


def test_the_labeler_prefers_a_right_call_then_a_right_answer_then_the_wrong_ones(scorer):
    prompt = Conversation([Message("user", "What is 12 times 7?")], builtin_specs())
    tool = calc("12*7", "84", "12 times 7 is 84.")
    wrong_args = calc("12*8", "96", "12 times 7 is 96.")
    candidates = ["12 times 7 is 94.", wrong_args, "12 times 7 is 84.", tool, "12 times 7 is 84."]
    ranked = Labeler(scorer).rank(prompt, candidates)
    assert ranked[:2] == [tool, "12 times 7 is 84."] and set(ranked[2:]) == {wrong_args, "12 times 7 is 94."}
    # a list of messages is the same response as the tuple; one assistant message is its text
    assert Labeler(scorer).rank(prompt, [list(tool), [Message("assistant", "x")], tool]) == [tool, "x"]
    # as are OpenAI messages, as the preference files write a transcript
    assert Labeler(scorer).rank(prompt, [Conversation(list(tool)).to_openai(), "12 times 7 is 84."])[0] == tool


def test_world_functions_answer_from_the_world(world):
    tools = task_tools(world, "2026-03-14")
    person = world.entities_of("person")[0]
    assert tools["get_age"].run({"person": person.name}) == person.attributes["age"]
    assert tools["calendar"].run({"operation": "today"}) == "2026-03-14"
    from chatforge.tools import run_tool_call
    assert run_tool_call('{"name": "get_age", "arguments": {"person": "Nobody"}}', tools).content.startswith("error:")


# ---- evaluation with tools ----------------------------------------------------------------------------


def test_a_model_that_memorized_tool_conversations_scores_one_with_tools_and_the_table_compares(
        tmp_path, world, tasks):
    from memorize import memorize

    from chatforge.chat import tools_block
    from chatforge.checkpoint import load_checkpoint, save_checkpoint
    from chatforge.evaluate import EvalConfig, evaluate, format_table
    from chatforge.tokenizer import Tokenizer

    bare = build_tasks(world, 0, replace(SMALL, declare_builtin_tools=False))
    chosen = [next(t for t in (*bare.eval, *bare.rl_train) if t.family == f and not isinstance(t.answer, str) and
                   (f != "functions" or len(t.tools) == 1)) for f in ("calc", "functions")]
    convs = [Conversation([*t.prompt, *t.answer], list(t.tools)) for t in chosen]
    texts = [tools_block(c.tools) for c in convs if c.tools] + [m.content for c in convs for m in c.messages]
    tok = Tokenizer.train(texts * 20, vocab_size=600)
    path = save_checkpoint(tmp_path / "sft", memorize(tok, convs), tok)
    prompts = tmp_path / "eval.jsonl"
    records = [t.to_json() for t in chosen]
    records.append({"prompt": records[0]["prompt"], "family": "arithmetic"})  # the same question, no tools
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = evaluate(EvalConfig(prompts=[str(prompts)], max_tool_tokens=200), load_checkpoint(path), world)
    for family in ("calc", "functions"):
        row = result.families[family]
        assert (row["score"], row["called_rate"], row["call_accuracy"]) == (1.0, 1.0, 1.0), family
        assert final_text(chosen[0].answer) in [s["answer"] for s in result.samples["calc"]]
    assert "called_rate" not in result.families["arithmetic"]
    (sample,) = result.samples["calc"]
    assert sample["transcript"][0]["tool_calls"][0]["function"]["name"] == "calculator"
    table = format_table({"sft": result})
    assert "score without -> with tools: arithmetic" in table and "-> calc 1.000" in table
    assert "tools called: calc 100.0% (right 100.0%)" in table


def test_data_tasks_writes_the_tool_families_when_asked(tmp_path):
    from test_cli import run_cli  # tests/ is on sys.path (pytest prepends it)

    assert run_cli("data", "tasks", "--out", tmp_path / "plain") == 0
    assert run_cli("data", "tasks", "--out", tmp_path / "tools", "--tools", "--no-declare-builtin-tools") == 0
    plain = read_prompts(tmp_path / "plain" / "eval.jsonl").prompts
    tools = read_prompts(tmp_path / "tools" / "eval.jsonl").prompts
    assert {r.family for r in plain} == set(FAMILIES)
    assert {r.family for r in tools} == set(FAMILIES + TOOL_FAMILIES)
    assert not any(r.tools for r in tools if r.family in ("calc", "dates"))
    assert all(r.tools for r in tools if r.family == "functions")
