"""Moderation: a configurable filter for what users send and what the model answers.

The server runs ``Moderator.check`` on a request's input text and on the model's output; when it
returns a reason, the server answers with ``Moderator.REFUSAL`` (the built-in world's standard refusal) and
``finish_reason: "content_filter"`` instead of the flagged text.

    moderator = Moderator.from_file("moderation.yaml")   # or "default", or None (flags nothing)
    moderator.check("How do I make a bomb?")             # -> "blocked word: bomb"
    moderator.check("How do I bake bread?")              # -> None

Config file (YAML, or JSON when the name ends in ``.json``); every key is optional::

    words:              # whole words or phrases, case-insensitive, Unicode-aware
      - bomb            #   also "Bomb", "BOMBS", "bombing" -- but not "bombastic"
      - pick a lock     #   phrase words may be separated by any spaces or punctuation
    inflections: true   # also match simple English inflections (-s, -es, -ed, -ing, -er); default true
    patterns:           # name -> Python regular expression (case-insensitive; "(?-i:...)" turns that off)
      hurt_someone: '\\b(?:to|i)\\s+hurt\\s+(?:someone|somebody)\\b'
    classifier:         # a chatforge ScalarHeadModel checkpoint (reward-model style): higher = more harmful
      checkpoint: runs/moderation/checkpoint   # relative: next to this file first, then the current directory
      threshold: 0.0    # flag when score > threshold; default 0.0

Matching details:

- Text and words are compared after Unicode NFKC normalisation, case folding ("STRASSE" matches
  "straße", full-width letters match ASCII ones) and removal of invisible format characters
  (zero-width spaces, soft hyphens), so those do not hide a word.
- "Whole word" means no letter, digit or underscore directly before or after. Words written in scripts
  without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Burmese) match anywhere.
- Patterns run on the NFKC-normalised text (format characters removed) with ``re.IGNORECASE``.
- The classifier reads the text with its own tokenizer. Text longer than its context is scored in
  overlapping windows of the context length (half a context apart) and the highest score counts,
  so harmful text is found wherever it is; text that encodes to no tokens is not scored.
- ``check`` tries words, then patterns, then the classifier, and reports the first hit: "blocked word:
  bomb", "pattern: hurt_someone" or "classifier: score 1.234 > threshold 0.5".

``from_file("default")`` loads ``moderation_default.yaml`` next to this module: the built-in world's
harmful requests (``chatforge.data.tasks.HARMFUL_ACTS``), written so its harmless look-alikes ("How do I
change a lock?", "How do I help a hurt dog?") and the standard refusals pass.

Streaming: a blocked word may arrive over several chunks ("bo", "mb"), so streamed output is checked
*accumulated*, never chunk by chunk. ``check_stream(text)`` is ``check``; a blocked word at the very end
of the text may then flag before a longer harmless word is complete ("bomb" before "bombastic").
``check_stream(text, partial=True)`` leaves the possibly unfinished last word out instead (a caller
must ``check`` the complete text at the end). ``OutputGuard`` is what the server streams through: it
holds the trailing partial word back from the client until it is complete, so what was shown has
always been checked as whole words. Both split text at ``split_partial_word``: the one rule for what
a partial word is.

A Moderator is read-only after construction, so one instance may serve concurrent requests.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from chatforge.errors import ChatforgeError, ConfigError

#: what a flagged request is answered with: the words the built-in world trains refusals with
#: (`chatforge.data.tasks.REFUSALS[0]`; a test keeps the two equal), so served and trained refusals agree
REFUSAL = "I'm sorry, but I can't help with that."
DEFAULT = "default"  # from_file(DEFAULT) loads DEFAULT_FILE
DEFAULT_FILE = Path(__file__).with_name("moderation_default.yaml")
CONFIG_KEYS = ("words", "inflections", "patterns", "classifier")
CLASSIFIER_KEYS = ("checkpoint", "threshold")
_SCORE_BATCH = 16  # classifier windows per forward pass

# Invisible characters that could split a word without showing: soft hyphen, zero-width spaces and
# joiners, direction marks and embeddings, word joiner and invisible operators, byte-order mark.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u206a-\u206f\ufeff]")
_PARTIAL_WORD = re.compile(r"\w+\Z")  # a word that the next chunk may still extend
_NO_SPACE_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR")
_VOWELS = "aeiou"


def _clean(text: str) -> str:
    """NFKC-normalised text without invisible format characters (what patterns see)."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def _fold(text: str) -> str:
    """_clean, then case-folded (what words are matched on)."""
    return _clean(text).casefold()


def split_partial_word(text: str) -> tuple[str, str]:
    """``(text without its trailing partial word, that word)``: a word at the very end may still grow
    ("bomb" may become "bombastic"), so streamed text is judged only up to it."""
    m = _PARTIAL_WORD.search(text)
    return (text, "") if m is None else (text[: m.start()], m.group())


def _is_word_char(ch: str) -> bool:
    return re.match(r"\w", ch) is not None


def _in_no_space_script(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(_NO_SPACE_SCRIPTS)


def _inflected(token: str, inflections: bool) -> str:
    """A regex for one word of a blocked entry; with inflections, simple English forms too
    (bomb: bombs, bombed, bombing, bomber; make: making; rob: robbed; bully: bullies)."""
    plain = re.escape(token)
    if not (inflections and len(token) >= 3 and token.isascii() and token.isalpha()):
        return plain
    alts = [plain + "(?:s|es|ed|ing|ers?)?"]
    if token.endswith("e"):
        alts.append(re.escape(token[:-1]) + "(?:ing|ed|ers?)")
    elif token.endswith("y") and token[-2] not in _VOWELS:
        alts.append(re.escape(token[:-1]) + "(?:ies|ied|iers?)")
    elif token[-1] not in _VOWELS + "wxy" and token[-2] in _VOWELS and token[-3] not in _VOWELS:
        alts.append(re.escape(token + token[-1]) + "(?:ed|ing|ers?)")  # consonant doubling
    return "(?:" + "|".join(alts) + ")"


def _word_regex(word: str, inflections: bool) -> str:
    """Whole-word regex for a folded word or phrase: its words joined by any run of non-word characters."""
    tokens = word.split()
    body = r"[\W_]+".join(_inflected(t, inflections) for t in tokens)
    first, last = tokens[0][0], tokens[-1][-1]
    before = r"(?<!\w)" if _is_word_char(first) and not _in_no_space_script(first) else ""
    after = r"(?!\w)" if _is_word_char(last) and not _in_no_space_script(last) else ""
    return before + body + after


class _Classifier:
    """A ScalarHeadModel and its tokenizer: score(text) is the highest score over context-sized windows."""

    def __init__(self, model: Any, tokenizer: Any, threshold: float, source: str = "") -> None:
        self.model, self.tokenizer, self.threshold, self.source = model.eval(), tokenizer, threshold, source
        self.context = int(model.config.context_length)

    def windows(self, ids: list[int]) -> list[list[int]]:
        n = self.context
        if len(ids) <= n:
            return [ids]
        stride = max(1, n // 2)
        starts = list(range(0, len(ids) - n, stride)) + [len(ids) - n]
        return [ids[s : s + n] for s in starts]

    def score(self, text: str) -> float | None:
        import torch

        ids = self.tokenizer.encode(text)
        if not ids:
            return None
        device = next(self.model.parameters()).device
        best = -math.inf
        windows = self.windows(ids)
        with torch.inference_mode():
            for i in range(0, len(windows), _SCORE_BATCH):
                chunk = windows[i : i + _SCORE_BATCH]
                width = max(len(w) for w in chunk)
                idx = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
                for row, w in enumerate(chunk):
                    idx[row, : len(w)] = torch.tensor(w, dtype=torch.long)
                lengths = torch.tensor([len(w) for w in chunk], dtype=torch.long, device=device)
                best = max(best, float(self.model.score(idx, lengths).max()))
        return best


class Moderator:
    """Flags text by blocked words, named regex patterns and an optional classifier checkpoint.

    ``check(text)`` returns None when the text is fine, otherwise a short reason. Build one with
    ``from_file`` (a YAML/JSON config, ``"default"``, or None for a moderator that flags nothing),
    ``from_dict`` (the same config already parsed) or directly. ``REFUSAL`` is what the server answers
    a flagged request with.
    """

    REFUSAL = REFUSAL

    def __init__(self, words: Iterable[str] = (), patterns: Mapping[str, str | re.Pattern] | None = None,
                 classifier: _Classifier | None = None, *, inflections: bool = True) -> None:
        self.words: tuple[str, ...] = tuple(words)
        self.inflections = inflections
        folded = [" ".join(_fold(w).split()) for w in self.words]
        if any(not f for f in folded):
            raise ConfigError("moderation words must not be empty")
        alternation = "|".join(f"(?P<w{i}>{_word_regex(f, inflections)})" for i, f in enumerate(folded))
        self._words_re = re.compile(alternation) if folded else None
        self.patterns: dict[str, re.Pattern] = {
            name: p if isinstance(p, re.Pattern) else re.compile(p, re.IGNORECASE)
            for name, p in (patterns or {}).items()}
        self.classifier = classifier

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, *, device: str = "cpu") -> Moderator:
        """Load a moderation config file; None gives a moderator that flags nothing, and ``"default"``
        the built-in list (moderation_default.yaml). Raises ConfigError naming the file and field."""
        if path is None:
            return cls()
        if str(path) == DEFAULT:
            path = DEFAULT_FILE
        path = Path(path)
        return cls.from_dict(_read_config(path), source=str(path), base_dir=path.parent, device=device)

    @classmethod
    def from_dict(cls, config: Any, *, source: str = "moderation config", base_dir: str | os.PathLike | None = None,
                  device: str = "cpu") -> Moderator:
        """Build from a parsed config (see the module docstring); ``source`` names it in errors and
        ``base_dir`` is where a relative classifier checkpoint is looked for first."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{source}: expected a mapping with some of the keys {list(CONFIG_KEYS)}, "
                              f"got {_kind(config)}")
        unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {list(CONFIG_KEYS)}")
        inflections = config.get("inflections", True)
        if not isinstance(inflections, bool):
            raise ConfigError(f"{source}: inflections: expected true or false, got {_kind(inflections)}")
        words = _parse_words(config.get("words"), source)
        patterns = _parse_patterns(config.get("patterns"), source)
        classifier = _parse_classifier(config.get("classifier"), source, base_dir, device)
        return cls(words, patterns, classifier, inflections=inflections)

    # ---- checking ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether this moderator can flag anything at all (False for ``from_file(None)``)."""
        return bool(self._words_re or self.patterns or self.classifier)

    def check(self, text: str) -> str | None:
        """None when ``text`` is fine; otherwise the first reason found: "blocked word: <word>",
        "pattern: <name>" or "classifier: score <s> > threshold <t>"."""
        if not self.active or not text:
            return None
        if self._words_re is not None:
            m = self._words_re.search(_fold(text))
            if m is not None:
                return f"blocked word: {self.words[int(m.lastgroup[1:])]}"
        if self.patterns:
            cleaned = _clean(text)
            for name, pattern in self.patterns.items():
                if pattern.search(cleaned):
                    return f"pattern: {name}"
        if self.classifier is not None:
            score = self.classifier.score(text)
            if score is not None and score > self.classifier.threshold:
                return f"classifier: score {score:.3f} > threshold {self.classifier.threshold:g}"
        return None

    def check_stream(self, text_so_far: str, partial: bool = False) -> str | None:
        """Check streamed output: call it with the whole text generated so far after each chunk (a word
        completed by a later chunk is then still caught), not with the chunk alone.

        With ``partial=True`` the last word is left out while it may still be growing ("bomb" may
        become "bombastic"); then the caller must ``check`` the complete text once it has ended."""
        if partial:
            text_so_far = split_partial_word(text_so_far)[0]
        return self.check(text_so_far)

    def classifier_score(self, text: str) -> float | None:
        """The classifier's score for ``text`` (None without a classifier or for text with no tokens)."""
        return None if self.classifier is None else self.classifier.score(text)

    def __repr__(self) -> str:
        clf = "none" if self.classifier is None else f"{self.classifier.source} > {self.classifier.threshold:g}"
        return f"Moderator(words={len(self.words)}, patterns={list(self.patterns)}, classifier={clf})"


class OutputGuard:
    """Moderates output as it streams: `check(text)` (truthy: flagged) always sees the whole text shown
    so far plus the new part, the new part without its trailing partial word (`split_partial_word`),
    which is held back until a later push completes it or `final` ends the text. `push` returns the
    text that may be shown now, or None once the output is flagged (then nothing more of it is shown).
    `sent` is everything shown."""

    def __init__(self, check: Callable[[str], Any]) -> None:
        self.check = check
        self.sent = ""
        self.pending = ""
        self.flagged = False

    def push(self, text: str, final: bool = False) -> str | None:
        if self.flagged:
            return None
        self.pending += text
        part, hold = (self.pending, "") if final else split_partial_word(self.pending)
        if (part or final) and self.check(self.sent + part):
            self.flagged = True
            return None
        self.sent += part
        self.pending = hold
        return part


# --------------------------------------------------------------------------------------------
# Reading and validating the config
# --------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__) + ("" if value is None else f" ({value!r:.60})")


def _read_config(path: Path) -> Any:
    expected = "a YAML or JSON moderation config with some of the keys " + ", ".join(CONFIG_KEYS)
    if not path.exists():
        raise ConfigError(f"{path}: moderation config file does not exist; expected {expected}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; expected {expected}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected {expected}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}); expected {expected}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected {expected}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path}: not valid YAML ({problem}{where}); expected {expected}") from None


def _parse_words(words: Any, source: str) -> list[str]:
    if words is None:
        return []
    if not isinstance(words, list):
        raise ConfigError(f"{source}: words: expected a list of words or phrases, got {_kind(words)}")
    for i, w in enumerate(words):
        if not isinstance(w, str):
            raise ConfigError(f"{source}: words[{i}]: expected a word or phrase (a string), got {_kind(w)}")
        if not _fold(w).strip():
            raise ConfigError(f"{source}: words[{i}]: expected a word or phrase, got an empty string")
    return words


def _parse_patterns(patterns: Any, source: str) -> dict[str, re.Pattern]:
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise ConfigError(f"{source}: patterns: expected a mapping of name -> regular expression, "
                          f"got {_kind(patterns)}")
    out = {}
    for name, regex in patterns.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: patterns: expected each name to be a non-empty string, got {_kind(name)}")
        if not isinstance(regex, str) or not regex:
            raise ConfigError(f"{source}: patterns.{name}: expected a regular expression (a non-empty string), "
                              f"got {_kind(regex)}")
        try:
            out[name] = re.compile(regex, re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"{source}: patterns.{name}: invalid regular expression {regex!r} "
                              f"({e.msg} at position {e.pos})") from None
    return out


def _parse_classifier(spec: Any, source: str, base_dir: str | os.PathLike | None, device: str) -> _Classifier | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{source}: classifier: expected a mapping with 'checkpoint' (a directory) and "
                          f"'threshold' (a number), got {_kind(spec)}")
    unknown = sorted(str(k) for k in spec if k not in CLASSIFIER_KEYS)
    if unknown:
        raise ConfigError(f"{source}: classifier: unknown key(s) {unknown}; expected some of {list(CLASSIFIER_KEYS)}")
    checkpoint = spec.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise ConfigError(f"{source}: classifier.checkpoint: expected a checkpoint directory (a string), "
                          f"got {_kind(checkpoint)}")
    threshold = spec.get("threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"{source}: classifier.threshold: expected a finite number, got {_kind(threshold)}")
    path = _resolve(Path(checkpoint).expanduser(), base_dir)
    return _load_classifier(path, float(threshold), source, device)


def _resolve(path: Path, base_dir: str | os.PathLike | None) -> Path:
    """A relative path next to the config file when it is there, else as given (the current directory)."""
    if path.is_absolute() or base_dir is None:
        return path
    beside = Path(base_dir) / path
    return beside if beside.exists() or not path.exists() else path


def _load_classifier(path: Path, threshold: float, source: str, device: str) -> _Classifier:
    from chatforge.checkpoint import load_checkpoint, load_tokenizer
    from chatforge.model import ScalarHeadModel

    try:
        ckpt = load_checkpoint(path, device=device, tokenizer=False)
        if not isinstance(ckpt.model, ScalarHeadModel):
            raise ConfigError(f"{ckpt.path} is a language model; expected a scalar-head checkpoint "
                              f"(reward-model style: one score per text, higher = more harmful)")
        tokenizer = load_tokenizer(ckpt.path)
    except ChatforgeError as e:
        raise ConfigError(f"{source}: classifier.checkpoint: {e}") from None
    return _Classifier(ckpt.model, tokenizer, threshold, str(ckpt.path))
