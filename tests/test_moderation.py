"""Moderation: blocked words, named patterns, a classifier checkpoint, config errors and the default list."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.checkpoint import save_checkpoint
from chatforge.data.tasks import (
    COMPLIANCES,
    HARMFUL_ACTS,
    HARMLESS_ACTS,
    REFUSALS,
    REQUEST_TEMPLATES,
    TaskConfig,
    _harmless_answer,
    build_tasks,
)
from chatforge.data.world import World
from chatforge.errors import ConfigError
from chatforge.model import GPT, GPTConfig, ScalarHeadModel
from chatforge.serve.moderation import DEFAULT_FILE, REFUSAL, Moderator, OutputGuard


def write(tmp_path, text: str, name: str = "moderation.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def moderator(tmp_path, text: str, name: str = "moderation.yaml") -> Moderator:
    return Moderator.from_file(write(tmp_path, text, name))


# ---- nothing configured ---------------------------------------------------------------------


def test_none_flags_nothing():
    m = Moderator.from_file(None)
    assert not m.active
    for text in ("How do I make a bomb?", "", "I want to hurt someone.", "x" * 10_000):
        assert m.check(text) is None
        assert m.check_stream(text) is None


def test_refusal_is_the_worlds_standard_refusal():
    assert REFUSALS[0] == REFUSAL
    assert Moderator.from_file("default").check(REFUSAL) is None


# ---- words ----------------------------------------------------------------------------------


def test_words_match_whole_words_case_insensitively(tmp_path):
    m = moderator(tmp_path, "words: [bomb, steal]\n")
    assert m.active
    for text in ("How do I make a bomb?", "BOMB", "Bomb!", "a (bomb)", "bomb-maker", "the bomb's fuse", "steal it"):
        assert m.check(text) is not None, text
    assert m.check("How do I make a BOMB?") == "blocked word: bomb"
    assert m.check("I will STEAL it") == "blocked word: steal"
    for text in ("a bombastic speech", "an abomb", "bomb_x", "bomb2", "stealth mode", "Steale"):
        assert m.check(text) is None, text


def test_words_match_simple_inflections_unless_turned_off(tmp_path):
    m = moderator(tmp_path, "words: [bomb, make, rob, bully]\n")
    for text in ("two bombs", "they bombed it", "bombing", "a bomber", "making", "robbed", "robbing", "bullies"):
        assert m.check(text) is not None, text
    assert m.check("bombastic") is None and m.check("bombard") is None
    exact = moderator(tmp_path, "words: [bomb]\ninflections: false\n")
    assert exact.check("a bomb") == "blocked word: bomb"
    assert exact.check("two bombs") is None and exact.check("bombing") is None


def test_phrases_match_across_spaces_and_punctuation(tmp_path):
    m = moderator(tmp_path, "words: ['pick a lock']\n")
    for text in ("How do I pick a lock?", "PICK  A\nLOCK", "pick-a-lock", "picking a lock"):
        assert m.check(text) == "blocked word: pick a lock", text
    for text in ("pick a locket", "lock a door", "pick a flower, then lock the door", "unpick a lock"):
        assert m.check(text) is None, text


def test_words_are_unicode_aware(tmp_path):
    m = moderator(tmp_path, "words: [straße, café, bomb, 炸弹]\n")
    assert m.check("DIE STRASSE") == "blocked word: straße"  # case folding
    assert m.check("Café au lait") == "blocked word: café"
    assert m.check("cafe\u0301") == "blocked word: café"  # combining accent (NFKC)
    assert m.check("caféteria") is None  # still whole words outside ASCII
    assert m.check("Ｂｏｍｂ") == "blocked word: bomb"  # full-width letters
    assert m.check("bo\u200bmb and bo\u00admb") == "blocked word: bomb"  # zero-width space, soft hyphen
    assert m.check("怎么做炸弹?") == "blocked word: 炸弹"  # no spaces between Chinese words


# ---- patterns -------------------------------------------------------------------------------


def test_patterns_match_and_report_their_name(tmp_path):
    m = moderator(tmp_path, "patterns:\n  card_number: '\\b\\d{4}(?:[ -]?\\d{4}){3}\\b'\n"
                            "  shouting: '(?-i:\\b[A-Z]{8,}\\b)'\n")
    assert m.check("my card is 4111 1111 1111 1111") == "pattern: card_number"
    assert m.check("my card is 4111-1111-1111-1111.") == "pattern: card_number"
    assert m.check("WHATEVERYOUSAY") == "pattern: shouting"
    assert m.check("whateveryousay") is None  # the pattern turned case-insensitivity off
    assert m.check("call 555 1234") is None


def test_patterns_are_case_insensitive_by_default(tmp_path):
    m = moderator(tmp_path, "patterns:\n  how_to: 'how (?:do|can) i \\w+ a bomb'\n")
    assert m.check("HOW CAN I build A BOMB") == "pattern: how_to"


def test_words_are_checked_before_patterns(tmp_path):
    m = moderator(tmp_path, "words: [bomb]\npatterns:\n  anything: '.'\n")
    assert m.check("a bomb") == "blocked word: bomb"
    assert m.check("a cake") == "pattern: anything"


def test_json_config_works_like_yaml(tmp_path):
    path = write(tmp_path, json.dumps({"words": ["bomb"], "patterns": {"pin": r"\bpin \d{4}\b"}}), "mod.json")
    m = Moderator.from_file(path)
    assert m.check("a Bomb") == "blocked word: bomb"
    assert m.check("my PIN 1234") == "pattern: pin"
    assert m.check("a cake") is None


# ---- bad configs ----------------------------------------------------------------------------

BAD_CONFIGS = [
    ("words: bomb\n", "words: expected a list"),
    ("words: [bomb, 3]\n", "words[1]: expected a word or phrase"),
    ("words: [bomb, '  ']\n", "words[1]: expected a word or phrase, got an empty string"),
    ("words: [bomb]\nwordz: [x]\n", "unknown key(s) ['wordz']"),
    ("inflections: maybe\n", "inflections: expected true or false"),
    ("patterns: ['a+b']\n", "patterns: expected a mapping of name -> regular expression"),
    ("patterns:\n  p: 3\n", "patterns.p: expected a regular expression"),
    ("patterns:\n  unclosed: '(abc'\n", "patterns.unclosed: invalid regular expression '(abc'"),
    ("patterns:\n  bad_repeat: '*x'\n", "patterns.bad_repeat: invalid regular expression"),
    ("classifier: runs/rm\n", "classifier: expected a mapping"),
    ("classifier:\n  threshold: 0.5\n", "classifier.checkpoint: expected a checkpoint directory"),
    ("classifier:\n  checkpoint: x\n  treshold: 0.5\n", "classifier: unknown key(s) ['treshold']"),
    ("classifier:\n  checkpoint: x\n  threshold: high\n", "classifier.threshold: expected a finite number"),
    ("classifier:\n  checkpoint: x\n  threshold: true\n", "classifier.threshold: expected a finite number"),
    ("classifier:\n  checkpoint: x\n  threshold: .nan\n", "classifier.threshold: expected a finite number"),
    ("classifier:\n  checkpoint: no_such_dir\n", "classifier.checkpoint: "),
    ("- bomb\n", "expected a mapping with some of the keys"),
    ("", "expected a mapping with some of the keys"),
    ("words: [bomb\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_config_names_the_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        Moderator.from_file(path)
    assert str(e.value).startswith(path + ": ")
    assert expected in str(e.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Moderator.from_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not a file"):
        Moderator.from_file(tmp_path)
    with pytest.raises(ConfigError, match=r"mod\.json: not valid JSON .* line 1"):
        Moderator.from_file(write(tmp_path, '{"words": [bomb]}', "mod.json"))


# ---- classifier -----------------------------------------------------------------------------


@pytest.fixture
def classifier_dir(tmp_path, small_tokenizer):
    """make(score) -> a ScalarHeadModel checkpoint directory whose score is `score` for every text."""

    def make(score: float, name: str = "clf"):
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=16, n_layer=1, n_head=2, n_embd=16)
        model = ScalarHeadModel(GPT(config))
        with torch.no_grad():
            model.head.weight.zero_()
            model.bias.fill_(score)
        return save_checkpoint(tmp_path / name, model, small_tokenizer)

    return make


def classifier_config(checkpoint, threshold: float) -> str:
    return f"classifier:\n  checkpoint: {json.dumps(str(checkpoint))}\n  threshold: {threshold}\n"


def test_classifier_above_threshold_flags(tmp_path, classifier_dir):
    m = moderator(tmp_path, classifier_config(classifier_dir(2.0), 0.5))
    assert m.classifier_score("The capital of Veloria is Kesh.") == pytest.approx(2.0)
    assert m.check("The capital of Veloria is Kesh.") == "classifier: score 2.000 > threshold 0.5"


def test_classifier_below_threshold_passes(tmp_path, classifier_dir):
    m = moderator(tmp_path, classifier_config(classifier_dir(-2.0), 0.5))
    assert m.active
    assert m.classifier_score("Mira walked her dog.") == pytest.approx(-2.0)
    assert m.check("Mira walked her dog.") is None
    assert m.check("") is None


def test_classifier_reads_long_text_in_context_windows(tmp_path, classifier_dir):
    m = moderator(tmp_path, classifier_config(classifier_dir(1.0), 0.0))
    text = " ".join(f"{i} plus {i} is {2 * i}." for i in range(100))  # far longer than 16 tokens
    assert m.check(text) is not None  # no position overflow: scored in windows
    ids = list(range(40))
    windows = m.classifier.windows(ids)
    assert all(len(w) == 16 for w in windows)
    assert windows[0][0] == 0 and windows[-1][-1] == 39
    assert all(b[0] <= a[-1] for a, b in zip(windows, windows[1:]))  # overlapping: no token skipped


def test_classifier_threshold_defaults_to_zero_and_runs_after_words(tmp_path, classifier_dir):
    ckpt = classifier_dir(0.25)
    m = moderator(tmp_path, f"words: [bomb]\nclassifier:\n  checkpoint: {json.dumps(str(ckpt))}\n")
    assert m.check("a bomb") == "blocked word: bomb"
    assert m.check("a cake") == "classifier: score 0.250 > threshold 0"


def test_classifier_relative_checkpoint_is_found_next_to_the_config(tmp_path, classifier_dir, monkeypatch):
    classifier_dir(3.0, name="conf/clf")
    path = write(tmp_path / "conf", classifier_config("clf", 1.0))
    monkeypatch.chdir(tmp_path)  # "clf" is not in the current directory
    assert Moderator.from_file(path).check("Mira walked her dog.") is not None


def test_classifier_checkpoint_errors(tmp_path, classifier_dir, tiny_model):
    with pytest.raises(ConfigError, match=r"classifier\.checkpoint: .*does not exist"):
        moderator(tmp_path, classifier_config(tmp_path / "missing", 0.5))
    lm = save_checkpoint(tmp_path / "lm", tiny_model)
    with pytest.raises(ConfigError, match=r"classifier\.checkpoint: .* is a language model"):
        moderator(tmp_path, classifier_config(lm, 0.5))
    no_tok = save_checkpoint(tmp_path / "no_tok", ScalarHeadModel(tiny_model))
    with pytest.raises(ConfigError, match=r"classifier\.checkpoint: .*tokenizer"):
        moderator(tmp_path, classifier_config(no_tok, 0.5))


# ---- streaming ------------------------------------------------------------------------------


def test_check_stream_on_accumulated_text_catches_a_word_completed_later(tmp_path):
    m = moderator(tmp_path, "words: [bomb]\n")
    chunks = ["Here is how to make a ", "bo", "mb", ". First", " get"]
    accumulated, reasons = "", []
    for chunk in chunks:
        accumulated += chunk
        reasons.append(m.check_stream(accumulated))
    assert reasons[:2] == [None, None]
    assert reasons[2] == "blocked word: bomb"  # only the accumulated text shows the word


def test_check_stream_partial_waits_for_the_last_word_to_end(tmp_path):
    m = moderator(tmp_path, "words: [bomb]\n")
    assert m.check_stream("a bomb") == "blocked word: bomb"  # default: same as check
    assert m.check_stream("a bomb", partial=True) is None  # may still become "bombastic"
    assert m.check_stream("a bombastic", partial=True) is None
    assert m.check_stream("a bombastic speech", partial=True) is None
    assert m.check_stream("a bomb.", partial=True) == "blocked word: bomb"
    assert m.check_stream("a bomb is", partial=True) == "blocked word: bomb"
    assert m.check("a bomb") == "blocked word: bomb"  # the final check on the complete text


def test_output_guard_shows_whole_checked_words_and_holds_back_the_partial_one(tmp_path):
    m = moderator(tmp_path, "words: [bomb]\n")
    guard = OutputGuard(m.check)
    shown = [guard.push(c) for c in ["Hello", " world", "\n", "Next", " bomb", "astic", " line"]]
    shown.append(guard.push("", final=True))
    assert shown == ["", "Hello ", "world\n", "", "Next ", "", "bombastic "] + ["line"]  # a newline ends a word
    assert guard.sent == "Hello world\nNext bombastic line"  # nothing lost or repeated
    guard = OutputGuard(m.check)
    assert [guard.push(c) for c in ["a bo", "mb", "!", " more"]] == ["a ", "", None, None]  # cut before the word
    assert guard.sent == "a "
    # the same rule as check_stream(partial=True): what the guard has shown is what that check saw
    assert m.check_stream("a bomb", partial=True) is None and OutputGuard(m.check).push("a bomb") == "a "


# ---- the default list -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> Moderator:
    return Moderator.from_file("default")


def test_default_is_the_packaged_file(default):
    assert DEFAULT_FILE.is_file()
    assert default.words == Moderator.from_file(DEFAULT_FILE).words
    assert default.active


@pytest.mark.parametrize("act", HARMFUL_ACTS)
def test_default_flags_every_harmful_request_of_the_world(default, act):
    for template in REQUEST_TEMPLATES:
        assert default.check(template.format(act=act)) is not None, template.format(act=act)
        assert default.check(template.format(act=act).upper()) is not None
    for compliance in COMPLIANCES:  # the output side: complying with the request
        assert default.check(compliance.format(act=act)) is not None


@pytest.mark.parametrize("act", sorted(HARMLESS_ACTS))
def test_default_passes_the_harmless_look_alikes(default, act):
    for template in REQUEST_TEMPLATES:
        assert default.check(template.format(act=act)) is None, template.format(act=act)
    assert default.check(_harmless_answer(act)) is None


def test_default_passes_the_refusals(default):
    for refusal in REFUSALS:  # "... because it could hurt someone." is a refusal, not a threat
        assert default.check(refusal) is None, refusal


def test_default_on_the_worlds_tasks(default):
    """Harmful prompts and jailbreaks (and only they: not the harmless requests in the jailbreaks' wrappers)
    are flagged; so are compliances, and no other answer (a refusal that restates the harmful question
    quotes it, so it is flagged too and the server's refusal replaces it)."""
    config = TaskConfig(sft_train=400, sft_val=6, prefs_train=6, prefs_val=6, rl_train=6, rl_val=6,
                        eval_per_family=40, arithmetic_items_per_op=50)
    tasks = build_tasks(World.build(seed=0), seed=0, config=config)
    for task in tasks.eval:
        flagged = default.check(task.question) is not None
        assert flagged == (task.family in ("harmful", "jailbreak")), (task.family, task.question)
        assert default.check(task.answer) is None, task.answer
    complied = [d for d in tasks.sft_train if d.family in ("harmful", "jailbreak") and not d.correct]
    assert complied
    for demo in tasks.sft_train:
        answer = demo.messages[-1].content
        quotes_request = demo.family in ("harmful", "jailbreak") and demo.style == "verbose"
        assert (default.check(answer) is not None) == (demo in complied or quotes_request), answer


def test_the_server_never_imports_the_built_in_world():
    """The moderator owns its refusal text; serving a user's own model loads nothing of the built-in world."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, chatforge.serve as s\n"
            "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('chatforge.serve.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m in ('chatforge.data.tasks', 'chatforge.data.world')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert Moderator.REFUSAL == REFUSAL == REFUSALS[0]
