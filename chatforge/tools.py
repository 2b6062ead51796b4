"""Built-in tools the chat model calls: a calculator and a calendar, and the registry that runs a call.

A tool is a name, a description, a JSON Schema for its arguments (OpenAI function-calling style) and
a ``run(arguments) -> str`` callable. The model writes a call as the JSON text
``{"name": ..., "arguments": {...}}``; :func:`run_tool_call` parses it, checks the arguments against
the schema, runs the tool under a time limit and returns a :class:`ToolResult` whose content the model
reads back as the tool's answer. Every failure, whatever its cause, becomes ``ok=False`` with content
``error: <what was wrong and what was expected>``, so the model can read it and try again; nothing
raises, nothing hangs. Results are short plain text ("42", "Friday", "-3") a small model can copy.

Calculator. The expression is first read by a small tokenizer here: it accepts only numbers, ``+ - * /``
(and the aliases ``× ÷ −``), ``**`` or ``^`` for powers, parentheses and spaces, and rewrites every
number literal as an exact integer ratio (``0.1`` becomes ``(1/10)``). The rewritten text is evaluated
by ``simpleeval`` with no names, no functions and only the seven operators below, each implemented
here on ``fractions.Fraction``. Why simpleeval and not ``eval`` or a hand-written ``ast`` walker:
simpleeval is a maintained evaluator built to refuse everything but the nodes it is given, so the
safety does not rest on our walker being complete; its one obstacle to exact results (Python parses
``0.1`` as a float) is removed by the literal rewriting, so the arithmetic is exact: ``0.1 + 0.2`` is
``0.3`` and ``1/7*7`` is ``1``. Limits, each costly one checked before the work it guards:

- the expression is at most ``MAX_EXPRESSION_CHARS`` (200) characters, checked first, so 10 kB of
  digits costs nothing;
- a number literal has at most ``MAX_LITERAL_DIGITS`` (30) digits;
- every intermediate and final result is below ``MAX_MAGNITUDE`` (10**30) in absolute value;
- a power's exponent is a whole number and the size of ``a ** n`` (its numerator and denominator) is
  estimated from ``|n| * log10`` before computing it, so ``9**9**9`` is refused at once: at most
  ``MAX_POWER_DIGITS`` (60) digits, which also stops ``0.5 ** 1000``;
- a wall-clock deadline (``CALC_TIME_LIMIT``, 0.5 s) checked at every operation, as a backstop.

Results print exactly when they are integers (no ``.0``) or terminating decimals of at most
``MAX_EXACT_DIGITS`` (30) significant digits; anything else (``1/3``) is rounded half-up to
``ROUNDED_DIGITS`` (12) significant digits. Non-integers print positionally ("0.25") from 10**-6 up to
10**12 (10**30 when exact) and in scientific notation beyond (``3.33333333333E+28``, ``1E-50``).

Calendar. One tool with an ``operation``: ``weekday`` of a ``date``, ``days_between`` a ``start`` and an
``end`` (signed: ``end - start``, positive when ``end`` is later, so "how many days until X" is
``start=today, end=X``), and ``today`` from an injectable clock. Dates are ISO ``YYYY-MM-DD`` only.
Two tools in all, so a tiny model has few names to learn.

Time limits: :func:`run_tool_call` runs each tool in a daemon thread and stops waiting after
``timeout`` seconds. A thread cannot be killed and a single C-level computation holding the GIL
(a huge integer power) would block even the waiting thread, which is why the calculator refuses such
work before starting it rather than relying on the timeout.
"""

from __future__ import annotations

import ast
import copy
import datetime
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

from simpleeval import InvalidExpression, SimpleEval

from chatforge.errors import ChatforgeError

MAX_EXPRESSION_CHARS = 200
MAX_LITERAL_DIGITS = 30
MAX_MAGNITUDE = 10**30
MAX_POWER_DIGITS = 60
MAX_EXACT_DIGITS = 30
ROUNDED_DIGITS = 12
CALC_TIME_LIMIT = 0.5  # seconds
TOOL_TIME_LIMIT = 1.0  # seconds, per call in run_tool_call
MAX_CALL_CHARS = 20_000  # longest tool-call text parsed
MAX_RESULT_CHARS = 500  # longest content handed back to the model

ALLOWED = "numbers, + - * / ^ ( ) and spaces"
_ALIASES = str.maketrans({"×": "*", "÷": "/", "−": "-"})
_TOKEN = re.compile(r"(?P<space>\s+)|(?P<number>\d+(?:\.\d*)?|\.\d+)|(?P<op>\*\*|[-+*/^()])")
_WORD = re.compile(r"\w+")  # a name when it starts with a letter or an underscore
_MALFORMED_NUMBER = re.compile(r"[\d.]*\.[\d.]*\.[\d.]*")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class ToolError(ChatforgeError):
    """A tool could not do what a call asked (bad expression, bad date, bad arguments).

    Its message says what was wrong and what was expected; run_tool_call hands it to the model.
    """


@dataclass(frozen=True)
class ToolResult:
    """What a tool call produced: the text the model reads, and whether the call succeeded."""

    content: str
    ok: bool


@dataclass(frozen=True)
class Tool:
    """A callable tool: `parameters` is the JSON Schema of `run`'s argument object (OpenAI style).

    `run` returns short plain text and raises ToolError with a readable message when it cannot.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], str]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON Schema with type 'object'")

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style function object, for the chat template and the API (a copy, safe to edit)."""
        return {"name": self.name, "description": self.description, "parameters": copy.deepcopy(self.parameters)}


# ---------------------------------------------------------------- calculator


def calculate(expression: str, time_limit: float = CALC_TIME_LIMIT) -> str:
    """Evaluate an arithmetic expression exactly and return the result as short text.

    Raises ToolError, with a message fit for the model, on anything but bounded arithmetic.
    """
    value = evaluate(expression, time_limit)
    return format_number(value)


def evaluate(expression: str, time_limit: float = CALC_TIME_LIMIT) -> Fraction:
    """The exact value of `expression` (see the module docstring for the grammar and limits)."""
    text = _rewrite(expression)
    evaluator = SimpleEval(operators=_operators(time.monotonic() + time_limit), functions={}, names={})
    try:
        return Fraction(evaluator.eval(text))
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (SyntaxError, InvalidExpression):
        raise ToolError(f"could not read {expression.strip()!r}; use {ALLOWED}, e.g. (2 + 3) * 4") from None
    except (RecursionError, MemoryError):
        raise ToolError(f"{expression.strip()!r} is too deeply nested") from None


def format_number(value: Fraction) -> str:
    """Integers as they are, terminating decimals exactly (up to 30 digits), others to 12 digits."""
    if value.denominator == 1:
        return str(value.numerator)
    exact = _terminating_decimal(value)
    if exact is not None:
        return _decimal_text(exact, MAX_EXACT_DIGITS)
    with localcontext() as context:
        context.prec, context.rounding = ROUNDED_DIGITS, ROUND_HALF_UP
        rounded = (Decimal(value.numerator) / Decimal(value.denominator)).normalize()
    return _decimal_text(rounded, ROUNDED_DIGITS)


def _rewrite(expression: str) -> str:
    """Check the characters, lengths and literals; return Python text with numbers as exact ratios."""
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be text, got {_json_type(expression)}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is {len(expression)} characters long; at most {MAX_EXPRESSION_CHARS}")
    text = expression.translate(_ALIASES)
    if not text.strip():
        raise ToolError(f"the expression is empty; write arithmetic with {ALLOWED}")
    malformed = _MALFORMED_NUMBER.search(text)
    if malformed:
        raise ToolError(f"{malformed.group()!r} is not a number")
    tokens = _tokenize(text)
    _check_structure(tokens)
    return " ".join(_python_token(kind, token) for kind, token in tokens)


def _tokenize(text: str) -> list[tuple[str, str]]:
    """Split into (kind, text) tokens, spaces dropped; refuse names and any other character."""
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ToolError(_unexpected(text, position))
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def _unexpected(text: str, position: int) -> str:
    """The message for the character at `position`, which no token accepts."""
    word = _WORD.match(text, position)
    word = word if word and (word.group()[0].isalpha() or word.group()[0] == "_") else None
    if word and word.group()[0] in "eE" and position and text[position - 1] in "0123456789.":
        return "scientific notation such as 1e5 is not supported; write the number out, like 100000"
    if word:
        return f"names and functions such as {word.group()!r} are not supported; use only {ALLOWED}"
    char = text[position]
    if char == ",":
        return "commas are not allowed; write 1000 not 1,000, and 1.5 not 1,5"
    return f"unexpected character {char!r} at position {position}; use only {ALLOWED}"


def _check_structure(tokens: list[tuple[str, str]]) -> None:
    """Refuse what Python would read as something other than arithmetic: calls, '//', bad parentheses."""
    depth = 0
    for (kind, token), (next_kind, next_token) in zip(tokens, tokens[1:] + [("end", "")]):
        depth += {"(": 1, ")": -1}.get(token, 0)
        if depth < 0:
            raise ToolError("unbalanced parentheses: a ')' has no matching '('")
        ends_value, starts_value = kind == "number" or token == ")", next_kind == "number" or next_token == "("
        if ends_value and starts_value:
            raise ToolError(f"missing operator between {token!r} and {next_token!r}; write * to multiply")
        if token == next_token == "/":
            raise ToolError("'//' is not an operator here; use / to divide")
    if depth > 0:
        raise ToolError("unbalanced parentheses: a '(' is never closed")


def _python_token(kind: str, token: str) -> str:
    """One token as Python text: '^' as '**', a number as an integer or a parenthesized exact ratio."""
    if kind != "number":
        return "**" if token == "^" else token
    whole, _, decimals = token.partition(".")
    if len(whole + decimals) > MAX_LITERAL_DIGITS:
        raise ToolError(f"the number {token!r} has more than {MAX_LITERAL_DIGITS} digits")
    numerator = int(whole + decimals or "0")
    return f"({numerator}/{10 ** len(decimals)})" if decimals else str(numerator)


def _operators(deadline: float) -> dict[type, Callable[..., Fraction]]:
    """simpleeval's operator table: exact Fraction arithmetic, each result checked against the limits."""

    def checked(value: Fraction, what: Callable[[], str]) -> Fraction:
        if time.monotonic() >= deadline:
            raise ToolError("the calculation took too long")
        if abs(value) >= MAX_MAGNITUDE:
            raise ToolError(f"{what()} is too large: numbers must stay below 10^30 in size")
        return value

    def binary(symbol: str, function: Callable[[Fraction, Fraction], Fraction]) -> Callable[..., Fraction]:
        def apply(a: Fraction | int, b: Fraction | int) -> Fraction:
            a, b = Fraction(a), Fraction(b)
            return checked(function(a, b), lambda: f"{format_number(a)} {symbol} {format_number(b)}")

        return apply

    def unary(function: Callable[[Fraction], Fraction]) -> Callable[..., Fraction]:
        return lambda a: checked(function(Fraction(a)), lambda: format_number(Fraction(a)))

    return {
        ast.Add: binary("+", lambda a, b: a + b),
        ast.Sub: binary("-", lambda a, b: a - b),
        ast.Mult: binary("*", lambda a, b: a * b),
        ast.Div: binary("/", _divide),
        ast.Pow: binary("**", _power),
        ast.USub: unary(lambda a: -a),
        ast.UAdd: unary(lambda a: a),
    }


def _divide(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise ToolError("division by zero")
    return a / b


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """`base ** exponent` for a whole exponent, refused before computing when the result would be huge."""
    if exponent.denominator != 1:
        raise ToolError(f"exponents must be whole numbers, got {format_number(exponent)}")
    n = exponent.numerator
    if base == 0 and n < 0:
        raise ToolError("division by zero (0 to a negative power)")
    if base not in (0, 1, -1):
        digits = abs(n) * max(math.log10(abs(base.numerator)), math.log10(base.denominator))
        if digits > MAX_POWER_DIGITS:
            grows = (abs(base) > 1) == (n > 0)
            what = f"{format_number(base)} ** {n}"
            if grows:
                raise ToolError(f"{what} is too large: numbers must stay below 10^30 in size")
            raise ToolError(f"{what} would need about {digits:.0f} digits; powers are limited to {MAX_POWER_DIGITS}")
    if base in (1, -1):
        return base if n % 2 else Fraction(1)  # an exponent of 10**29 costs nothing this way
    return base**n


def _terminating_decimal(value: Fraction) -> Decimal | None:
    """`value` as an exact Decimal when its expansion ends within MAX_EXACT_DIGITS digits, else None."""
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return None
    places = max(twos, fives)  # the fewest decimal places that hold value exactly
    scaled = value.numerator * 10**places // value.denominator
    if abs(scaled) >= 10**MAX_EXACT_DIGITS:
        return None
    return Decimal(f"{scaled}E-{places}")  # built from text: exact, whatever the context's precision


def _decimal_text(value: Decimal, digits: int) -> str:
    """Positional notation when it shows the value faithfully, scientific otherwise."""
    if -6 <= value.adjusted() < digits:
        return format(value, "f")
    return str(value)


# ---------------------------------------------------------------- calendar


def parse_date(text: str, field: str = "date") -> datetime.date:
    """An ISO date (YYYY-MM-DD) that exists; ToolError naming `field` otherwise."""
    if not isinstance(text, str) or not _ISO_DATE.fullmatch(text.strip()):
        raise ToolError(f"{field} must be a date written YYYY-MM-DD, like 2024-03-15; got {text!r}")
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError as exc:
        raise ToolError(f"{field} {text!r} is not a real date ({exc})") from None


def weekday(date: str) -> str:
    """The English weekday name of an ISO date: '2024-03-15' -> 'Friday' (not locale-dependent)."""
    return WEEKDAYS[parse_date(date).weekday()]


def days_between(start: str, end: str) -> str:
    """Signed whole days from `start` to `end`: positive when `end` is later, '0' for the same day."""
    return str((parse_date(end, "end") - parse_date(start, "start")).days)


def today_text(today: Callable[[], datetime.date] = datetime.date.today) -> str:
    """Today's date as YYYY-MM-DD, from the injectable clock `today` (a datetime counts as its date)."""
    value = today()
    if isinstance(value, datetime.datetime):
        value = value.date()
    return value.isoformat()


_CALENDAR_FIELDS = {"weekday": ("date",), "days_between": ("start", "end"), "today": ()}


def _run_calendar(arguments: dict[str, Any], today: Callable[[], datetime.date]) -> str:
    """Dispatch one calendar operation, refusing arguments it lacks or does not take."""
    operation = arguments.get("operation")
    if operation not in _CALENDAR_FIELDS:
        raise ToolError(f'"operation" must be one of {", ".join(_CALENDAR_FIELDS)}; got {operation!r}')
    needed = _CALENDAR_FIELDS[operation]
    for field in needed:
        if field not in arguments:
            raise ToolError(f'operation {operation!r} needs argument "{field}" (YYYY-MM-DD)')
    for field in arguments:
        if field != "operation" and field not in needed:
            takes = ", ".join(f'"{f}"' for f in needed) or "no other arguments"
            raise ToolError(f'operation {operation!r} does not take "{field}"; it takes {takes}')
    if operation == "weekday":
        return weekday(arguments["date"])
    if operation == "days_between":
        return days_between(arguments["start"], arguments["end"])
    return today_text(today)


# ---------------------------------------------------------------- registry


def _date_property(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


def builtin_tools(today: Callable[[], datetime.date] = datetime.date.today) -> dict[str, Tool]:
    """The built-in tools by name: `calculator` and `calendar` (whose clock is `today`)."""
    calculator = Tool(
        name="calculator",
        description="Exact arithmetic: numbers, + - * /, ^ for powers, parentheses. Returns the result.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (2 + 3) * 4.5"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
        run=lambda arguments: calculate(arguments["expression"]),
    )
    calendar = Tool(
        name="calendar",
        description="Dates: the weekday of a date, the days from start to end, or today's date (YYYY-MM-DD).",
        parameters={
            "type": "object",
            "properties": {
                "operation": {"type": "string", "enum": list(_CALENDAR_FIELDS)},
                "date": _date_property("for weekday: YYYY-MM-DD"),
                "start": _date_property("for days_between: YYYY-MM-DD"),
                "end": _date_property("for days_between: YYYY-MM-DD; the result is end - start in days"),
            },
            "required": ["operation"],
            "additionalProperties": False,
        },
        run=lambda arguments: _run_calendar(arguments, today),
    )
    return {tool.name: tool for tool in (calculator, calendar)}


def run_tool_call(call_json: str, tools: Mapping[str, Tool], timeout: float = TOOL_TIME_LIMIT) -> ToolResult:
    """Run the call the model wrote (`{"name": ..., "arguments": {...}}`) and return its result.

    `arguments` may be an object or a JSON-encoded string (as OpenAI sends it); missing or null means
    no arguments. Never raises and never waits more than about `timeout` seconds: every failure is
    ``ToolResult("error: ...", ok=False)``, content capped at MAX_RESULT_CHARS characters.
    """
    try:
        tool, arguments = _parse_call(call_json, tools)
        check_arguments(arguments, tool.parameters, tool.name)
        result = _run_with_timeout(tool, arguments, timeout)
    except ToolError as exc:
        result = ToolResult(f"error: {exc}", ok=False)
    except Exception as exc:  # a bug in a tool or a schema must still reach the model as text
        result = ToolResult(f"error: {type(exc).__name__}: {exc}", ok=False)
    return ToolResult(_cap(result.content), result.ok)


def _parse_call(call_json: str, tools: Mapping[str, Tool]) -> tuple[Tool, dict[str, Any]]:
    """The tool named by the call and its argument object; ToolError saying what is wrong otherwise."""
    expected = 'expected {"name": "<tool>", "arguments": {...}}'
    known = ", ".join(tools) or "none"
    if not isinstance(call_json, str):
        raise ToolError(f"the tool call must be JSON text, got {type(call_json).__name__}; {expected}")
    if len(call_json) > MAX_CALL_CHARS:
        raise ToolError(f"the tool call is {len(call_json)} characters long; at most {MAX_CALL_CHARS}")
    call = _load_json(call_json, "the tool call", expected)
    if not isinstance(call, dict):
        raise ToolError(f"the tool call must be a JSON object, got {_json_type(call)}; {expected}")
    name = call.get("name")
    if not isinstance(name, str):
        raise ToolError(f'the tool call has no "name" string; {expected} with one of: {known}')
    if name not in tools:
        raise ToolError(f"unknown tool {name!r}; known tools: {known}")
    arguments = call.get("arguments")
    if isinstance(arguments, str):
        arguments = _load_json(arguments or "{}", '"arguments"', "expected a JSON object")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolError(f'"arguments" must be a JSON object, got {_json_type(arguments)}')
    return tools[name], arguments


def _load_json(text: str, what: str, expected: str) -> Any:
    """json.loads, with any failure (bad syntax, absurd nesting) as a ToolError naming `what`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ToolError(f"{what} is not valid JSON ({reason}); {expected}") from None


_JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict,
               "array": list, "null": type(None)}


def check_arguments(arguments: Mapping[str, Any], schema: Mapping[str, Any], tool: str = "the tool") -> None:
    """Check an argument object against a tool's JSON Schema (properties, required, enum, type,
    additionalProperties); ToolError naming the field and what was expected otherwise."""
    properties = schema.get("properties", {})
    for field in schema.get("required", []):
        if field not in arguments:
            kind = properties.get(field, {}).get("type", "value")
            raise ToolError(f'{tool} needs argument "{field}" ({kind})')
    for field, value in arguments.items():
        if field not in properties:
            if schema.get("additionalProperties", True) is False:
                raise ToolError(f'{tool} got unexpected argument "{field}"; its arguments are: {", ".join(properties)}')
            continue
        _check_value(field, value, properties[field], tool)


def _check_value(field: str, value: Any, schema: Mapping[str, Any], tool: str) -> None:
    """One argument against its property schema: JSON type (a bool is not a number) and enum."""
    kind = schema.get("type")
    if kind in _JSON_TYPES:
        is_bool = isinstance(value, bool)
        fits = isinstance(value, _JSON_TYPES[kind]) and (kind == "boolean" or not is_bool)
        if not fits:
            raise ToolError(f'argument "{field}" of {tool} must be {_article(kind)}, got {_json_type(value)}')
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(map(str, schema["enum"]))
        raise ToolError(f'argument "{field}" of {tool} must be one of: {choices}; got {value!r}')


def _run_with_timeout(tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolResult:
    """Run `tool` in a daemon thread; stop waiting after `timeout` seconds (the thread is abandoned)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = tool.run(arguments)
        except BaseException as exc:  # reported to the caller, never lost in the thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return ToolResult(f"error: tool {tool.name!r} gave no result within {timeout:g} s", ok=False)
    error = box.get("error")
    if isinstance(error, ToolError):
        return ToolResult(f"error: {error}", ok=False)
    if error is not None or "value" not in box:
        return ToolResult(f"error: tool {tool.name!r} failed: {type(error).__name__}: {error}", ok=False)
    value = box["value"]
    if not isinstance(value, str):
        return ToolResult(f"error: tool {tool.name!r} returned {type(value).__name__}, not text", ok=False)
    return ToolResult(value, ok=True)


def _cap(content: str) -> str:
    """At most MAX_RESULT_CHARS characters, marked when cut."""
    if len(content) <= MAX_RESULT_CHARS:
        return content
    marker = " … (truncated)"
    return content[: MAX_RESULT_CHARS - len(marker)] + marker


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    names = {str: "a string", dict: "an object", list: "an array", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
