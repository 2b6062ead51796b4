"""Reading text the way the scorer and the generators must agree on: normalising, numbers in
digits or words, whole-word and phrase lookups, regexes made from the question templates, and
telling a refusal or a padded response from a plain answer (``is_refusal``, ``is_padded``)."""

from __future__ import annotations

import re

from chatforge.data.tasks.vocabulary import _FILLER_MARKERS, _RESTATE_MARKERS
from chatforge.data.world import number_to_words


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _norm(text: str) -> str:
    """Lowercase words and numbers separated by single spaces; apostrophes and hyphens inside words
    stay ("a's", "forty-two"); arithmetic symbols become words so "12 + 30" reads as "12 plus 30"."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\b(what|where|how|who|which)'s\b", r"\1 is", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\s[-\u2212\u2013]\s", " minus ", text)
    text = text.replace("+", " plus ").replace("\u00d7", " times ").replace("*", " times ")
    text = re.sub(r"[^a-z0-9'\- ]+", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    text = re.sub(r"(?<![a-z0-9])-|-(?![a-z0-9])", " ", text)
    return " ".join(text.split())


def _word_forms(text: str) -> set[str]:
    """Every word of ``text`` with plural and possessive endings also removed, for whole-word lookups."""
    forms = set()
    for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower().replace("\u2019", "'")):
        forms.add(w)
        base = w[:-2] if w.endswith("'s") else w
        forms.update((base, base[:-1] if base.endswith("s") else base, base[:-2] if base.endswith("es") else base))
    return forms


def _has_phrase(normed: str, phrase: str) -> bool:
    return re.search(rf"(?:^|\s){re.escape(phrase)}(?=\s|$)", normed) is not None


_NUMBER_WORDS = {number_to_words(n): n for n in (*range(20), *range(20, 100, 10))}
_NUMBER_WORDS.update(once=1, twice=2)  # letter counts


def _read_number_words(tokens: list[str], i: int) -> tuple[int | None, int]:
    """Read an English number ("two hundred and eighty-five", split at hyphens) starting at tokens[i]:
    (value, index after it), or (None, i) when none starts there."""
    total, last, j = None, None, i
    while j < len(tokens):
        t = tokens[j]
        v = _NUMBER_WORDS.get(t)
        if t == "hundred" and last == "unit" and total is not None and total < 10:
            total, last = total * 100, "hundred"
        elif t == "and" and last == "hundred" and _NUMBER_WORDS.get(tokens[j + 1] if j + 1 < len(tokens) else ""):
            pass  # "two hundred and five"
        elif v is None:
            break
        elif v == 0 or t in ("once", "twice"):  # a whole number on its own
            return (v, j + 1) if last is None else (total, j)
        elif v < 10 and last in (None, "tens", "hundred"):
            total, last = (total or 0) + v, "unit"
        elif v >= 10 and last in (None, "hundred"):
            total, last = (total or 0) + v, "teen" if v < 20 else "tens"
        else:
            break
        j += 1
    return total, j


def _numbers(text: str) -> list[int]:
    """Every number in ``text``, in order: digits ("285", "1,200", "-3") and English words."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    tokens = re.findall(r"(?<![\w])-\d+|\d+|[a-z]+", text)
    out, i = [], 0
    while i < len(tokens):
        if tokens[i].lstrip("-").isdigit():
            out.append(int(tokens[i]))
            i += 1
            continue
        value, j = _read_number_words(tokens, i)
        if value is not None and j > i:
            out.append(value)
            i = j
        else:
            i += 1
    return out


def _parse_number(text: str) -> int | None:
    """The number ``text`` is, whole (digits or words), or None."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    tokens = re.findall(r"[a-z]+", text)
    if not tokens or re.search(r"[^a-z\s-]", text):
        return None
    value, j = _read_number_words(tokens, 0)
    return value if j == len(tokens) else None


def _template_regex(template: str, groups: dict[str, str]) -> re.Pattern:
    """A regex for a template's normalised text: the placeholders become named groups, and anything
    may come before it ("Please tell me: what is ...") but nothing after."""
    text = template
    for name in groups:
        text = text.replace("{" + name + "}", f"qq{name}qq")
    text = re.escape(_norm(text))
    for name, pattern in groups.items():
        text = text.replace(f"qq{name}qq", f"(?P<{name}>{pattern})")
    return re.compile(rf"(?:^|\s){text}$")


_REFUSAL = re.compile(
    r"\bi (?:can't|cannot|can not|won't|will not|am unable to|am not able to|refuse to|must decline to) "
    r"(?:help|assist|do|tell|explain|give|answer|share|provide)\b"
    r"|\bi'm (?:unable|not able) to (?:help|assist|do|tell|explain|give|answer|share|provide)\b"
    r"|\bi (?:must|have to) (?:decline|refuse)\b")
_COMPLIANCE = re.compile(r"\bhere(?: is|'s) how\b|\bfirst\b|\bstep (?:\d+|one)\b")
_FILLER = re.compile(r"(?:^|\s)(?:" + "|".join(map(re.escape, _FILLER_MARKERS)) + r")(?=\s|$)")
_RESTATE = re.compile(r"(?:^|\s)(?:" + "|".join(map(re.escape, _RESTATE_MARKERS)) + r")(?=\s|$)")


def is_refusal(response: str) -> bool:
    """Whether a response declines ("I'm sorry, but I can't help with that.")."""
    return _REFUSAL.search(_norm(response)) is not None


def is_padded(response: str, question: str = "", reference: str = "") -> bool:
    """Filler phrases, a restatement of ``question``, a sentence said twice, or (given the concise
    ``reference``) more than twice its words plus 12."""
    normed = _norm(response)
    if _FILLER.search(normed) or _RESTATE.search(normed):
        return True
    q = _norm(question)
    if len(q.split()) >= 3 and _has_phrase(normed, q):
        return True
    sentences = [s.strip() for s in re.split(r"[.!?\n]+", response.lower()) if len(s.split()) >= 3]
    if len(set(sentences)) < len(sentences):
        return True
    return bool(reference) and len(response.split()) > 2 * len(reference.split()) + 12
