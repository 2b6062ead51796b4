"""`chatforge feedback export`: comparisons and thumbs pairs become preference records the reward stage reads."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sqlalchemy", reason="sqlalchemy is not installed (the server's dependencies)")

from click.testing import CliRunner  # noqa: E402

from chatforge.data.chat_readers import read_preferences  # noqa: E402
from chatforge.errors import DataError  # noqa: E402
from chatforge.serve.feedback import export_preferences, feedback, preference_records  # noqa: E402
from chatforge.serve.store import Store  # noqa: E402


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    store = Store(url)
    yield url, store
    store.close()


def answered(store, question, answers, system="", history=()):
    """A conversation: `history` turns, then `question` answered by each of `answers` (regenerated)."""
    conv = store.create_conversation(system_prompt=system)
    parent = None
    for i, text in enumerate(history):
        parent = store.add_message(conv["id"], "user" if i % 2 == 0 else "assistant", text, parent_id=parent)["id"]
    user = store.add_message(conv["id"], "user", question, parent_id=parent)
    return conv, user, [store.add_message(conv["id"], "assistant", a, parent_id=user["id"]) for a in answers]


def test_comparisons_become_pairs_and_ties_and_identical_answers_are_skipped(db):
    _, store = db
    conv, user, _ = answered(store, "Capital of Veloria?", [], system="Be brief.")
    store.add_comparison("Kesh.", "No idea.", "a", conversation_id=conv["id"], parent_id=user["id"])
    store.add_comparison("Dunno.", "Kesh!", "b", prompt="Capital of Veloria?")
    store.add_comparison("Kesh.", "Kesh", "tie", prompt="Capital?")
    store.add_comparison("Same.", "Same.", "a", prompt="Capital?")
    store.add_comparison("Dunno.", "Kesh!", "b", prompt="Capital of Veloria?")  # the same pair again
    records, stats = preference_records(store)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Veloria?"}],
         "Kesh.", "No idea."),
        ([{"role": "user", "content": "Capital of Veloria?"}], "Kesh!", "Dunno.")]
    assert all(r["source"] == "comparison" for r in records)
    assert (stats.records, stats.from_comparisons, stats.ties, stats.identical, stats.duplicates) == (2, 2, 1, 1, 1)


def test_thumbs_up_and_down_on_the_same_prompt_make_pairs(db):
    _, store = db
    _, _, (good, bad, good2) = answered(store, "What is 3 plus 4?", ["7", "34", "Seven."])
    for message, value in ((good, 1), (bad, -1), (good2, 1)):
        store.rate(message["id"], value)
    # the same question in another conversation is the same prompt ...
    _, _, (bad2,) = answered(store, "What is 3 plus 4?", ["12"])
    store.rate(bad2["id"], -1)
    # ... but not with another system prompt, or after other turns, or a lone rating
    _, _, (other,) = answered(store, "What is 3 plus 4?", ["7"], system="Answer in French.")
    store.rate(other["id"], 1)
    _, _, (later,) = answered(store, "What is 3 plus 4?", ["8"], history=["Hi", "Hello!"])
    store.rate(later["id"], -1)
    _, _, (same_up, same_down) = answered(store, "Hi?", ["Hello.", "Hello."])  # same text both ways: no pair
    store.rate(same_up["id"], 1)
    store.rate(same_down["id"], -1)
    records, stats = preference_records(store)
    prompt = [{"role": "user", "content": "What is 3 plus 4?"}]
    assert {(json.dumps(r["prompt"]), r["chosen"], r["rejected"]) for r in records} == {
        (json.dumps(prompt), up, down) for up in ("7", "Seven.") for down in ("34", "12")}
    assert all(r["source"] == "thumbs" and len(r["message_ids"]) == 2 for r in records)
    assert (stats.from_thumbs, stats.rated, stats.identical) == (4, 8, 1)


def test_the_exported_file_is_what_read_preferences_reads(db, tmp_path):
    url, store = db
    conv, user, (a, b) = answered(store, "Where does Mira live?", ["In Kesh.", "Nowhere."], system="Be kind.",
                                  history=["Hi", "Hello!"])
    store.rate(a["id"], 1)
    store.rate(b["id"], -1)
    store.add_comparison("She lives in Kesh.", "Mars.", "a", conversation_id=conv["id"], parent_id=user["id"])
    out = tmp_path / "out" / "prefs.jsonl"
    stats = export_preferences(url, out)
    assert (stats.records, stats.from_comparisons, stats.from_thumbs) == (2, 1, 1)
    prefs = read_preferences(out).preferences
    assert [p.texts() for p in prefs] == [["She lives in Kesh.", "Mars."], ["In Kesh.", "Nowhere."]]
    assert [(m.role, m.content) for m in prefs[0].prompt] == [
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Where does Mira live?")]
    assert not list(tmp_path.glob("out/.*.tmp"))  # written through a temporary file, renamed into place


def test_nothing_to_export_is_an_error_that_leaves_the_old_file_alone(db, tmp_path):
    url, store = db
    store.add_comparison("A", "B", "tie", prompt="p")
    out = tmp_path / "prefs.jsonl"
    out.write_text("old\n")
    with pytest.raises(DataError, match="no preference pairs to export .1 comparisons, 1 ties"):
        export_preferences(url, out)
    assert out.read_text() == "old\n"
    with pytest.raises(DataError, match="no such database file"):
        export_preferences(tmp_path / "missing.db", out)
    assert not (tmp_path / "missing.db").exists()  # not created by looking
    (tmp_path / "other.db").write_bytes(b"")  # a SQLite file without our tables
    with pytest.raises(DataError, match="cannot read feedback"):
        export_preferences(tmp_path / "other.db", out)


def test_the_export_command_and_chatforge_reward_training_on_its_output(db, tmp_path, small_tokenizer):
    from test_cli import run_cli

    from chatforge.checkpoint import load_checkpoint, save_checkpoint
    from chatforge.model import GPT, GPTConfig, ScalarHeadModel

    url, store = db
    for i in range(3):
        store.add_comparison(f"The answer is {i}.", "I do not know, sorry.", "a", prompt=f"What is {i} plus 0?")
    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(feedback, ["export", "--db", url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"feedback: 3 preference records (3 from comparisons, 0 from thumbs) -> {out}"
    result = CliRunner().invoke(feedback, ["export", "--db", str(tmp_path / "chat.db"), "--out", str(out), "--json"])
    assert json.loads(result.output)["records"] == 3  # a plain path is a SQLite file
    assert len(read_preferences(out).preferences) == 3

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64,
                                                    n_layer=1, n_head=2, n_embd=16)), tokenizer=small_tokenizer)
    status = run_cli("reward", "--init-from", tmp_path / "sft", "--data", out, "--out", tmp_path / "rm",
                     "--max-steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--eval-every", "2",
                     "--save-every", "2", "--normalize-samples", "0", "--no-progress")
    assert status == 0
    assert isinstance(load_checkpoint(tmp_path / "rm").model, ScalarHeadModel)


def test_the_feedback_command_is_on_the_chatforge_command_line_once_registered(db, tmp_path, capsys):
    from test_cli import run_cli

    from chatforge.cli import cli

    if "feedback" not in cli.commands:
        pytest.skip("`feedback` is not registered in chatforge/cli.py yet (cli.add_command(feedback))")
    url, store = db
    store.add_comparison("A", "B", "b", prompt="p")
    assert run_cli("feedback", "export", "--db", url, "--out", tmp_path / "p.jsonl") == 0
    assert "1 preference record (" in capsys.readouterr().out
    assert run_cli("feedback", "export", "--db", tmp_path / "nope.db", "--out", tmp_path / "p.jsonl") == 2
    assert "no such database file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Answers that used the server's built-in tools


def calc(expression: str, result: str, at: int, ok: bool = True) -> dict:
    """A built-in calculator call an answer made, `at` characters into its text."""
    return {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
            "content": result, "ok": ok, "at": at}


def builtin_specs() -> list[dict]:
    from chatforge.tools import builtin_tools

    return [t.spec() for t in builtin_tools().values()]


def test_answers_that_used_tools_export_as_openai_messages_with_the_tools_the_model_saw(db):
    _, store = db
    specs = builtin_specs()  # what `chatforge serve --builtin-tools` declared (web.py records it)
    conv, user, _ = answered(store, "What is 12*7, and 1/0?", [])
    checked = "Let me check. "
    store.add_comparison(checked + "It is 84, and 1/0 has no value.", "About 80.", "a", conversation_id=conv["id"],
                         parent_id=user["id"], tools=specs,
                         tool_turns_a=[calc("12*7", "84", len(checked)),
                                       calc("1/0", "error: division by zero", len(checked), ok=False)])
    # thumbs on answers made with the tools declared, one of which called none
    good = store.add_message(conv["id"], "assistant", "84.", parent_id=user["id"], tools=specs,
                             tool_turns=[calc("12*7", "84", 0)])
    bad = store.add_message(conv["id"], "assistant", "Eighty.", parent_id=user["id"], tools=specs)
    store.rate(good["id"], 1)
    store.rate(bad["id"], -1)
    # an answer from a server without tools is another prompt: no pair with the ones above
    old = store.add_message(conv["id"], "assistant", "No idea.", parent_id=user["id"])
    store.rate(old["id"], -1)
    store.add_comparison("Kesh.", "Mars.", "a", prompt="Capital of Veloria?")  # no tools anywhere: as before

    records, stats = preference_records(store)
    assert (stats.records, stats.from_comparisons, stats.from_thumbs, stats.invalid) == (3, 2, 1, 0)
    compared, plain, thumbs = records
    call = lambda n, expr: {"id": f"call_{n}", "type": "function",  # noqa: E731
                            "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}
    assert compared["chosen"] == [
        {"role": "assistant", "content": checked, "tool_calls": [call(1, "12*7"), call(2, "1/0")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"},
        {"role": "tool", "tool_call_id": "call_2", "content": "error: division by zero"},
        {"role": "assistant", "content": "It is 84, and 1/0 has no value."}]
    assert compared["rejected"] == "About 80."  # an answer without tool turns stays a string
    assert compared["tools"] == [{"type": "function", "function": spec} for spec in specs]
    assert compared["prompt"] == [{"role": "user", "content": "What is 12*7, and 1/0?"}]
    assert thumbs["chosen"] == [{"role": "assistant", "content": "", "tool_calls": [call(1, "12*7")]},
                                {"role": "tool", "tool_call_id": "call_1", "content": "84"},
                                {"role": "assistant", "content": "84."}]
    assert thumbs["rejected"] == "Eighty." and thumbs["tools"] == compared["tools"]
    assert thumbs["message_ids"] == [good["id"], bad["id"]]
    assert plain == {"prompt": [{"role": "user", "content": "Capital of Veloria?"}], "chosen": "Kesh.",
                     "rejected": "Mars.", "source": "comparison", "comparison_id": 2}  # exactly as before


def test_a_tool_answer_without_recorded_tools_gets_the_built_in_ones_and_one_ending_on_a_result_is_skipped(db):
    _, store = db
    # an answer saved through the API without `tools` by a server that had none recorded
    store.add_comparison("It is 84.", "80.", "a", prompt="12*7?", tool_turns_a=[calc("12*7", "84", 0)])
    # all its text came before the call: the answer ends on a tool result, nothing after it to judge
    store.add_comparison("Let me check.", "80.", "a", prompt="12*7 again?",
                         tool_turns_a=[calc("12*7", "84", len("Let me check."))])
    records, stats = preference_records(store)
    (record,) = records
    assert record["tools"] == [{"type": "function", "function": spec} for spec in builtin_specs()]
    assert stats.invalid == 1


def test_the_exported_tool_turns_are_what_the_preference_reader_and_the_reward_model_read(db, tmp_path,
                                                                                         small_tokenizer):
    from test_cli import run_cli

    from chatforge.checkpoint import load_checkpoint, save_checkpoint
    from chatforge.model import GPT, GPTConfig, ScalarHeadModel

    url, store = db
    specs = builtin_specs()
    for i in range(3):
        store.add_comparison(f"It is {i * 7}.", "I do not know.", "a", prompt=f"What is {i}*7?", tools=specs,
                             tool_turns_a=[calc(f"{i}*7", str(i * 7), 0)])
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(url, out).records == 3
    prefs = read_preferences(out).preferences
    assert [f["name"] for f in prefs[0].tools] == ["calculator", "calendar"]
    chosen, rejected = prefs[0].responses
    assert [m.role for m in chosen] == ["tool_call", "tool_result", "assistant"]
    assert json.loads(chosen[0].content) == {"name": "calculator", "arguments": {"expression": "0*7"}}
    assert (chosen[1].content, chosen[2].content) == ("0", "It is 0.")
    assert [(m.role, m.content) for m in rejected] == [("assistant", "I do not know.")]

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=256,
                                                    n_layer=1, n_head=2, n_embd=16)), tokenizer=small_tokenizer)
    status = run_cli("reward", "--init-from", tmp_path / "sft", "--data", out, "--out", tmp_path / "rm",
                     "--max-steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--eval-every", "2",
                     "--save-every", "2", "--normalize-samples", "0", "--no-progress")
    assert status == 0
    assert isinstance(load_checkpoint(tmp_path / "rm").model, ScalarHeadModel)


def test_a_database_from_before_tool_turns_exports_as_before(tmp_path):
    from test_store import old_database

    path = old_database(tmp_path / "old.db")
    out = tmp_path / "prefs.jsonl"
    stats = export_preferences(path, out)
    assert (stats.records, stats.from_comparisons, stats.from_thumbs) == (2, 1, 1)
    assert [(r["chosen"], r["rejected"], "tools" in r) for r in map(json.loads, out.read_text().splitlines())] == [
        ("A", "B", False), ("Kesh.", "Mars.", False)]
