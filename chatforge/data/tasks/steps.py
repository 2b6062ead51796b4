"""Step-by-step answers: word tasks and arithmetic reasoned out in small steps before the usual answer.

Why: the models this world trains are tiny (2-10M parameters) and read byte-level BPE tokens, so
they cannot see the letters inside "kesh" or the digits inside "285". One step from the question
to "hsek" or "332" is too much for them; a chain of steps, each of which attention can do, is not
(chain of thought). Every format below writes the pieces a token hides -- letters, digits -- as
single tokens (separated by spaces, which the GPT-2 pre-tokenizer always splits: " k", " 4"), and
ends with the family's usual concise answer, so the scorer reads the same final sentence as before.

- **Reverse** ("kesh"): ``Spelled: 1 k 2 e 3 s 4 h. Backwards: 4 h 3 s 2 e 1 k. The word kesh
  reversed is hsek.`` Spelling copies letters from the model's memory of the word (the skill the
  corpus's spelling games teach); each letter comes after its position, so the backwards list is an
  induction lookup: write the previous number minus one, then copy the letter that follows that
  number in the spelled list. Without the numbers a word with a repeated letter ("v o v u n i a")
  makes "the letter before the one I just copied" ambiguous; with them every lookup is unique.
- **Count** ("e" in "kesh"): ``Counting e: k 0, e 1, s 1, h 1. The letter e appears 1 time in the
  word kesh.`` One pass over the spelled word with a running count: each count is the previous one
  (three tokens back) plus one when the letter just written is the asked one (in the prompt); the
  answer copies the last count. No step needs more than one comparison and one increment.
- **Plus / minus** (up to 3 digits): ``0 4 7 plus 2 8 5: 7 plus 5 is 12, 4 plus 8 plus 1 is 13, 0
  plus 2 plus 1 is 3, so 3 3 2. 47 plus 285 is 332.`` The numbers are first written as three spaced
  digits each (zero-padded), then each column from the right -- ones, tens, hundreds -- adds its two
  digits and the carry, which is the previous column's sum over 9 (the third term). Minus borrows
  the same way: ``2 8 5 minus 0 4 7: 15 minus 7 is 8, 8 minus 4 minus 1 is 3, 2 minus 0 minus 0 is
  2, so 2 3 8.`` (the top digit written with the borrowed ten; the next column subtracts the
  borrow). ``so`` gathers the columns' last digits in reading order, so the final number is a merge
  of adjacent digits. Every column is always written and every number below 20 is one token of the
  full-size (2048) tokenizer, so each clause has the same length every time: a column's digits sit
  at fixed distances back in the header, and each step is a fixed-offset lookup and a one-digit sum.
  (Labelled steps -- "Ones: ..., Tens: ..." -- read better but cost about 20 more tokens, and a
  question in number words with its answer in number words already fills most of the 128-token
  context.)
- **Times** (2-digit x 1-digit): ``4 7 times 6: 7 times 6 is 42, 4 times 6 plus 4 is 28, so 2 8 2.
  47 times 6 is 282.`` -- a times-table fact per column plus the carry.
- **Spell** is letter by letter already and is unchanged.

The final sentence is always the direct answer (``_arithmetic_answer``, ``_word_answer``), in
words when the question used words; the steps are in digits. ``after_steps`` is how the scorer
reads a response: the text after its last step, so the numbers inside the steps never count as the
answer, and a response cut off inside its steps has no answer. ``TaskConfig.step_by_step=False``
demonstrates the direct answers instead (the ablation); the scorer judges both the same way.

Wrong demonstrations are *slips*: one step goes wrong (a column's sum off by one, a letter copied
out of order, a count that misses a letter) and the rest follows from it, so the final answer is
wrong in the way a model that slipped would be wrong. The families draw a slip (``*_slip``) whether
or not they use it, so every prompt is the same with and without step-by-step answers.
"""

from __future__ import annotations

import random
import re

from chatforge.data.tasks.answers import _apply, _arithmetic_answer, _times, _word_answer
from chatforge.data.tasks.text import _capitalize
from chatforge.data.world import WORD_GAME_STATEMENTS

Slip = tuple[int, int]  # (step index, change): which step goes wrong and by how much
# A step, from its start to the end of its sentence: a word task's label ("Spelled:", "Backwards:",
# "Counting e:") or an arithmetic header of spaced digits ("0 4 7 plus 2 8 5:"), which no direct answer
# ("12 + 30 = 42", "The answer is: 42.") looks like.
_STEP = re.compile(r"(?:^|(?<=[\s\"'.!?:]))(?:spelled|backwards|counting [a-z]|\d(?: \d)+ (?:plus|minus|times) "
                   r"\d(?: \d)*):[^.!?\n]*", re.IGNORECASE)


def after_steps(text: str) -> str:
    """What a response says after its last step: all of it when it has no steps, nothing after a
    response cut off inside its steps."""
    ends = [m.end() for m in _STEP.finditer(text)]
    return text[ends[-1]:] if ends else text


def _spaced(digits: list[int] | str) -> str:
    return " ".join(str(d) for d in digits)


def _digits(n: int, width: int) -> list[int]:
    """``n``'s digits, most significant first, zero-padded to ``width``."""
    return [int(c) for c in str(n).zfill(width)]


# ---- word tasks ---------------------------------------------------------------------------------


def reverse_steps(word: str, slip: Slip | None = None) -> str:
    """Spelled with positions, backwards with positions, then the answer. ``slip`` = (i, list): two
    neighbouring letters (i, i+1) swapped in the spelled list (list 0) or the backwards one (list 1),
    or one dropped where the two are the same letter; what follows is consistent with the slip."""
    forward = list(enumerate(word, 1))
    if slip is not None and slip[1] == 0:
        forward = _swap(forward, slip[0])
    backward = forward[::-1]
    if slip is not None and slip[1] == 1:
        backward = _swap(backward, slip[0])
    result = "".join(c for _, c in backward)
    answer = _capitalize(WORD_GAME_STATEMENTS["reverse"][0].format(w=word, x=result))
    return (f"Spelled: {' '.join(f'{i} {c}' for i, c in forward)}. "
            f"Backwards: {' '.join(f'{i} {c}' for i, c in backward)}. {answer}")


def _swap(pairs: list[tuple[int, str]], i: int) -> list[tuple[int, str]]:
    """The letters at i and i+1 swapped (positions stay), or the letter at i dropped when they are equal."""
    out = list(pairs)
    (n1, c1), (n2, c2) = out[i], out[i + 1]
    if c1 == c2:
        return out[:i] + out[i + 1:]
    out[i], out[i + 1] = (n1, c2), (n2, c1)
    return out


def reverse_slip(word: str, rng: random.Random) -> Slip:
    """A slip for ``reverse_steps``: a neighbouring pair in one of the two lists."""
    return rng.randrange(len(word) - 1), rng.randrange(2)


def count_steps(word: str, letter: str, slip: Slip | None = None) -> str:
    """Each letter with the running count of ``letter``, then the answer. ``slip`` = (i, d): the
    count at letter i is off by d (a missed or a false match) and the counting goes on from there."""
    running, parts = 0, []
    for i, c in enumerate(word):
        running += (c == letter) + (slip[1] if slip is not None and slip[0] == i else 0)
        parts.append(f"{c} {running}")
    answer = _capitalize(WORD_GAME_STATEMENTS["count"][0].format(w=word, c=letter, x=_times(running)))
    return f"Counting {letter}: {', '.join(parts)}. {answer}"


def count_slip(word: str, letter: str, rng: random.Random) -> Slip:
    """A slip for ``count_steps``: a matching letter missed (-1), or another letter counted (+1)."""
    miss = rng.random() < 0.5
    hits = [i for i, c in enumerate(word) if c == letter]
    others = [i for i, c in enumerate(word) if c != letter]
    i, j = rng.choice(hits or others), rng.choice(others or hits)
    return (i, -1) if miss and hits else (j, 1) if others else (i, -1)


def word_answer(task: str, word: str, letter: str = "", steps: bool = True) -> str:
    """The right answer to a word task: step by step (reverse and count) or direct."""
    if steps and task == "reverse":
        return reverse_steps(word)
    if steps and task == "count":
        return count_steps(word, letter)
    return _word_answer(task, word, letter)


# ---- arithmetic ---------------------------------------------------------------------------------


def _plus_columns(a: int, b: int, slip: Slip | None) -> tuple[list[str], int] | None:
    da, db, carry, result, steps = _digits(a, 3), _digits(b, 3), 0, 0, []
    for j in range(3):
        t, d = da[2 - j], db[2 - j]
        s = t + d + carry + (slip[1] if slip is not None and slip[0] == j else 0)
        if not 0 <= s <= (9 if j == 2 else 19):  # a slip that leaves the column's range
            return None
        steps.append(f"{t} plus {d}{f' plus {carry}' if j else ''} is {s}")
        result, carry = result + (s % 10) * 10 ** j, s // 10
    return steps, result


def _minus_columns(a: int, b: int, slip: Slip | None) -> tuple[list[str], int] | None:
    da, db, borrow, result, steps = _digits(a, 3), _digits(b, 3), 0, 0, []
    for j in range(3):
        t, d = da[2 - j], db[2 - j]
        lend = t - d - borrow < 0
        top = t + 10 * lend
        x = top - d - borrow + (slip[1] if slip is not None and slip[0] == j else 0)
        if not 0 <= x <= 9:
            return None
        steps.append(f"{top} minus {d}{f' minus {borrow}' if j else ''} is {x}")
        result, borrow = result + x * 10 ** j, int(lend)
    return steps, result


def _times_columns(a: int, b: int, slip: Slip | None) -> tuple[list[str], int] | None:
    tens, ones = _digits(a, 2)
    p = ones * b + (slip[1] if slip is not None and slip[0] == 0 else 0)
    q = tens * b + p // 10 + (slip[1] if slip is not None and slip[0] == 1 else 0)
    if p < 0 or q < 0:
        return None
    return [f"{ones} times {b} is {p}", f"{tens} times {b} plus {p // 10} is {q}"], q * 10 + p % 10


def _in_range(op: str, a: int, b: int) -> bool:
    if op == "plus":
        return a >= 0 and b >= 0 and a + b <= 999
    if op == "minus":
        return 0 <= b <= a <= 999
    return min(a, b) >= 0 and max(a, b) <= 99 and min(a, b) <= 9


def arithmetic_steps(op: str, a: int, b: int, words: bool, slip: Slip | None = None) -> str | None:
    """Column by column (see the module docstring), then "a op b is c." in the question's style; None
    when the numbers are outside the columns' range (or ``slip`` leaves a column's range)."""
    if not _in_range(op, a, b):
        return None
    x, y = (a, b) if op != "times" or b <= 9 else (b, a)  # times: the one-digit factor second
    columns = {"plus": _plus_columns, "minus": _minus_columns, "times": _times_columns}[op](x, y, slip)
    if columns is None:
        return None
    steps, result = columns
    width = (2, 1) if op == "times" else (3, 3)
    header = f"{_spaced(_digits(x, width[0]))} {op} {_spaced(_digits(y, width[1]))}:"
    return (f"{header} {', '.join(steps)}, so {_spaced(_digits(result, 3))}. "
            f"{_arithmetic_answer(op, a, b, words, result)}")


def arithmetic_slip(op: str, a: int, b: int, rng: random.Random) -> Slip | None:
    """A slip that changes the result and keeps every column in range (None if there is none)."""
    candidates = [(j, d) for j in range(2 if op == "times" else 3) for d in (-1, 1)]
    right = _apply(op, a, b)
    for slip in rng.sample(candidates, len(candidates)):
        text = arithmetic_steps(op, a, b, False, slip)
        if text is not None and not text.endswith(f" {right}."):
            return slip
    return None


def arithmetic_answer(op: str, a: int, b: int, words: bool, steps: bool = True) -> str:
    """The right answer: column by column where the numbers allow it and ``steps``, else direct."""
    return (arithmetic_steps(op, a, b, words) if steps else None) or _arithmetic_answer(op, a, b, words)
