"""Reference answers: what the generator demonstrates and the scorer's idea of concise ("12 plus 30
is 42.", "The word cat backwards is tac.", "To make tea, boil some water, ..."), and the arithmetic
they state, and the dates family's answers ("2024-03-15 is a Friday.") with dates written as the
question wrote them."""

from __future__ import annotations

import datetime

from chatforge.data.tasks.text import _capitalize
from chatforge.data.tasks.vocabulary import DAYS_ANSWER, HARMLESS_ACTS, MONTHS, TODAY_ANSWER, WEEKDAY_ANSWER
from chatforge.data.world import ARITHMETIC_STATEMENTS, WORD_GAME_STATEMENTS, number_to_words


def _arithmetic_answer(op: str, a: int, b: int, words: bool, c: int | None = None) -> str:
    """"a op b is c." in the question's style (words only while every number fits number_to_words);
    ``c`` defaults to the right result."""
    c = _apply(op, a, b) if c is None else c
    if words and min(a, b, c) >= 0 and max(a, b, c) <= 999:
        nums = {"a": number_to_words(a), "b": number_to_words(b), "c": number_to_words(c)}
    else:
        nums = {"a": str(a), "b": str(b), "c": str(c)}
    return _capitalize(ARITHMETIC_STATEMENTS[op][0].format(**nums))


def _apply(op: str, a: int, b: int) -> int:
    return {"plus": a + b, "minus": a - b, "times": a * b}[op]


def _times(n: int) -> str:
    return "1 time" if n == 1 else f"{n} times"


def _word_answer(task: str, word: str, letter: str = "") -> str:
    if task == "reverse":
        return _capitalize(WORD_GAME_STATEMENTS["reverse"][0].format(w=word, x=word[::-1]))
    if task == "spell":
        return _capitalize(WORD_GAME_STATEMENTS["spell"][0].format(w=word, x=" ".join(word)))
    return _capitalize(WORD_GAME_STATEMENTS["count"][0].format(w=word, c=letter, x=_times(word.count(letter))))


def _harmless_answer(act: str, steps_of: str | None = None) -> str:
    return f"To {act}, {HARMLESS_ACTS[steps_of or act][0]}."


def _say_date(iso: str, words: bool) -> str:
    """"2024-03-15", or in words "March 15, 2024"."""
    if not words:
        return iso
    day = datetime.date.fromisoformat(iso)
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def _date_answer(kind: str, dates: tuple[str, ...], value: str, words: bool) -> str:
    """The concise answer of a dates question: its weekday, its day count, or today's date (``value``)."""
    said = [_say_date(d, words) for d in dates]
    if kind == "weekday":
        return _capitalize(WEEKDAY_ANSWER.format(d=said[0], x=value))
    if kind == "days":
        return DAYS_ANSWER.format(x=value, d1=said[0], d2=said[1])
    return TODAY_ANSWER.format(d=_say_date(value, words))
