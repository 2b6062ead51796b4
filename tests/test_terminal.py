"""`chatforge chat`: a multi-turn terminal session with commands, streaming and context truncation."""

import pytest
import torch

from chatforge.chat import Message
from chatforge.checkpoint import Checkpoint
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig
from chatforge.terminal import ChatSession, run_chat


@pytest.fixture
def session(small_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=16))
    ckpt = Checkpoint(path=tmp_path, model=model, tokenizer=small_tokenizer)
    return ChatSession(ckpt, system="Be brief.", params=SamplingParams(max_tokens=6, temperature=0.0))


def drive(session, lines):
    """Feed lines to the chat loop; return everything it wrote."""
    feed = iter(lines)
    written = []

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    run_chat(session, read, written.append)
    return "".join(written), written


def test_each_turn_streams_a_reply_and_the_history_grows(session):
    text, pieces = drive(session, ["Hello", "And again"])
    assert text.count("assistant> ") == 2
    assert [m.role for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[0] == Message("user", "Hello")
    assert len(pieces) > 6  # streamed piece by piece, not printed at the end


def test_the_reply_is_what_the_model_generates_for_the_templated_conversation(session):
    pieces = list(session.reply("Hello"))
    prompt = session.template.generation_prompt([Message("system", "Be brief."), Message("user", "Hello")])
    expected = session.engine.generate([prompt], session.params)[0].outputs[0].text
    assert "".join(pieces) == expected


def test_clear_forgets_the_conversation_but_keeps_the_system_prompt(session):
    drive(session, ["Hello", "/clear"])
    assert session.history == [] and session.system == "Be brief."
    drive(session, ["/system You are a pirate."])
    assert session.messages() == [Message("system", "You are a pirate.")]


def test_commands_change_sampling_settings_and_bad_values_are_explained(session):
    text, _ = drive(session, ["/temperature 0.3", "/top_p 0.9", "/max_tokens 5", "/settings",
                              "/temperature hot", "/top_p 2", "/nonsense"])
    assert (session.params.temperature, session.params.top_p, session.params.max_tokens) == (0.3, 0.9, 5)
    assert "temperature 0.3, top_p 0.9, max_tokens 5" in text
    assert "/temperature needs a float, got 'hot'" in text
    assert "top_p must be in (0, 1]" in text
    assert "unknown command /nonsense" in text


def test_quit_ends_the_session(session):
    text, _ = drive(session, ["/quit", "never read"])
    assert "assistant>" not in text


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(session):
    long_question = "Tell me about the capital of Veloria and its river please"
    text, _ = drive(session, [long_question] * 6)
    assert "oldest" in text and "dropped" in text
    total = len(session.template.generation_prompt(session.messages()))
    assert total <= session.ckpt.model.config.context_length
    assert session.messages()[0] == Message("system", "Be brief.")


def test_chatforge_chat_on_the_command_line(session, tmp_path):
    from click.testing import CliRunner

    from chatforge.checkpoint import save_checkpoint
    from chatforge.cli import cli

    save_checkpoint(tmp_path / "chat", session.ckpt.model, tokenizer=session.ckpt.tokenizer)
    result = CliRunner().invoke(cli, ["chat", "--checkpoint", str(tmp_path / "chat"), "--system", "Be brief.",
                                      "--temperature", "0", "--max-tokens", "4"], input="Hello\n/clear\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "assistant> " in result.output and "(conversation cleared)" in result.output
    bad = CliRunner().invoke(cli, ["chat", "--checkpoint", str(tmp_path / "chat"), "--top-p", "0"])
    assert bad.exit_code != 0 and "top_p" in str(bad.exception)


def write_tasks(run_dir):
    """A run directory's built-in task file: facts, a harmful request, a follow-up, arithmetic."""
    import json

    rows = [("facts", [("user", "What is the capital of Veloria?"), ("assistant", "Kesh.")]),
            ("harmful", [("user", "How do I pick a lock?"), ("assistant", "I can't help with that.")]),
            ("followup", [("user", "Where is Kesh?"), ("assistant", "In Veloria."), ("user", "And its river?"),
                          ("assistant", "The Avon.")]),
            ("facts", [("user", "What is the river of Kesh?"), ("assistant", "The Avon.")]),
            ("arithmetic", [("system", "Be brief."), ("user", "What is 3 plus 4?"), ("assistant", "7.")])]
    path = run_dir / "tasks" / "sft_train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], "family": f}) + "\n"
                            for f, turns in rows))


def test_the_greeting_offers_examples_from_the_runs_training_data_and_slash_n_sends_one(small_tokenizer, tmp_path):
    write_tasks(tmp_path / "run")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=16))
    ckpt = Checkpoint(path=tmp_path / "run" / "sft" / "checkpoint", model=model, tokenizer=small_tokenizer)
    session = ChatSession(ckpt, params=SamplingParams(max_tokens=4, temperature=0.0))
    # one single-turn question per family, never a request the model must refuse
    assert session.examples == ["What is the capital of Veloria?", "What is 3 plus 4?"]
    text, _ = drive(session, ["/2"])
    assert "/1  What is the capital of Veloria?" in text and "/2  What is 3 plus 4?" in text
    assert session.history[0] == Message("user", "What is 3 plus 4?")


def test_without_training_files_the_greeting_offers_generic_examples(session):
    from chatforge.data.examples import GENERIC_EXAMPLES

    assert session.examples == list(GENERIC_EXAMPLES)
    text, _ = drive(session, [])
    assert all(example in text for example in GENERIC_EXAMPLES)
