"""The built-in tools as a specification: exact arithmetic, refused abuse, the calendar, and tool calls."""

import datetime
import json
import time

import pytest

from chatforge.tools import (
    MAX_RESULT_CHARS,
    Tool,
    ToolError,
    ToolResult,
    builtin_tools,
    calculate,
    check_arguments,
    run_tool_call,
)

FRIDAY = datetime.date(2024, 3, 15)


@pytest.fixture
def tools() -> dict[str, Tool]:
    return builtin_tools(today=lambda: FRIDAY)


def call(tools, name: str, **arguments) -> ToolResult:
    return run_tool_call(json.dumps({"name": name, "arguments": arguments}), tools)


def timed_call(tools, name: str, **arguments) -> ToolResult:
    """A call that must come back, whatever it asked, well within a second."""
    start = time.perf_counter()
    result = call(tools, name, **arguments)
    assert time.perf_counter() - start < 1.0
    return result


# ---------------------------------------------------------------- calculator: exact arithmetic


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2", "3"),
        ("123456789 * 987654321", "121932631112635269"),
        ("0.1 + 0.2", "0.3"),  # exact, not 0.30000000000000004
        ("7 / 2", "3.5"),
        ("10 / 2", "5"),  # integers print without .0
        ("1.5 * 2", "3"),
        ("3.0", "3"),
        ("12.50", "12.5"),
        ("100 - 0.01", "99.99"),
        ("1 / 7 * 7", "1"),  # exact fractions throughout, rounded only at the end
        ("123456789.123456789 + 1", "123456790.123456789"),
        ("1 / 3", "0.333333333333"),  # non-terminating: 12 significant digits
        ("2 / 3", "0.666666666667"),
        ("10**29 / 3", "3.33333333333E+28"),
        (".5 + 5.", "5.5"),
        ("007 + 1", "8"),
        ("  42  ", "42"),
    ],
)
def test_calculator_is_exact(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("10 - 4 - 3", "3"),  # left to right
        ("10 / 4 / 5", "0.5"),
        ("((1 + 2) * (3 + 4))", "21"),
        ("-5 + 2", "-3"),
        ("-(2 + 3)", "-5"),
        ("--4", "4"),
        ("+4", "4"),
        ("3 * -2", "-6"),
    ],
)
def test_calculator_precedence_parentheses_and_unary_minus(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 ** 10", "1024"),
        ("2 ^ 10", "1024"),  # ^ is a power, not xor
        ("2 ^ 3 ^ 2", "512"),  # right-associative: 2^(3^2)
        ("-2 ^ 2", "-4"),  # the power binds tighter than unary minus, as in mathematics
        ("(-2) ^ 2", "4"),
        ("2 ** -2", "0.25"),
        ("1.5 ^ 2", "2.25"),
        ("10 ** 29", "100000000000000000000000000000"),
        ("(-1) ** 99999999999", "-1"),
        ("0 ** 0", "1"),
    ],
)
def test_calculator_powers(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression, expected", [("6 × 7", "42"), ("84 ÷ 2", "42"), ("10 − 3", "7"), ("−3 × −2", "6")])
def test_calculator_accepts_typographic_operators(expression, expected):
    assert calculate(expression) == expected


# ---------------------------------------------------------------- calculator: abuse is refused, fast


@pytest.mark.parametrize(
    "expression, message",
    [
        ("9**9**9", "too large"),
        ("9^9^9^9", "too large"),
        ("10 ** 30", "below 10^30"),
        ("(10**29) * (10**29)", "too large"),
        ("2 ** 1000000000000", "too large"),
        ("0.5 ** 1000", "powers are limited"),
        ("2 ** 0.5", "whole numbers"),
        ("1 / 0", "division by zero"),
        ("1 / (2 - 2)", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("", "empty"),
        ("   ", "empty"),
        ("1 +", "could not read"),
        ("2 * * 3", "could not read"),
        ("(1 + 2", "never closed"),
        ("1 + 2)", "no matching"),
        ("2 (3)", "missing operator"),
        ("(1)(2)", "missing operator"),
        ("1.2.3", "not a number"),
        ("1,000", "commas"),
        ("1 // 2", "'//'"),
        ("7 % 2", "unexpected character '%'"),
        ("2²", "unexpected character '²'"),
        ("1 < 2", "unexpected character '<'"),
        ("1e5", "scientific notation"),
        ("x + 1", "'x'"),
        ("sqrt(2)", "names and functions"),
        ("__import__('os').system('ls')", "names and functions"),
        ("(1).real", "unexpected character '.'"),
        ("'a' * 3", "unexpected character"),
        ("[1, 2]", "unexpected character"),
        ("1 if 1 else 2", "names and functions"),
        ("1" * 10_000, "at most 200"),
        ("1" * 31, "more than 30 digits"),
        ("0." + "1" * 30, "more than 30 digits"),
    ],
)
def test_calculator_refuses_with_a_clear_message_quickly(tools, expression, message):
    result = timed_call(tools, "calculator", expression=expression)
    assert not result.ok
    assert result.content.startswith("error: ")
    assert message in result.content
    with pytest.raises(ToolError, match="."):
        calculate(expression)


@pytest.mark.parametrize(
    "expression, expected",
    [("-" * 199 + "1", "-1"), ("(" * 99 + "1" + ")" * 99, "1"), ("1+" * 99 + "1", "100")],
)
def test_deep_but_short_expressions_still_evaluate(tools, expression, expected):
    assert timed_call(tools, "calculator", expression=expression) == ToolResult(expected, True)


def test_wall_clock_limit_is_a_backstop():
    with pytest.raises(ToolError, match="took too long"):
        calculate("1 + 1", time_limit=0.0)


# ---------------------------------------------------------------- calendar


@pytest.mark.parametrize(
    "date, expected",
    [("2024-03-15", "Friday"), ("2000-01-01", "Saturday"), ("2024-02-29", "Thursday"), ("1970-01-01", "Thursday")],
)
def test_weekday_of_a_date(tools, date, expected):
    assert call(tools, "calendar", operation="weekday", date=date) == ToolResult(expected, True)


@pytest.mark.parametrize(
    "start, end, expected",
    [
        ("2024-03-01", "2024-03-15", "14"),
        ("2024-03-15", "2024-03-01", "-14"),  # signed: end - start
        ("2024-03-15", "2024-03-15", "0"),
        ("2024-01-01", "2025-01-01", "366"),  # a leap year
        ("2023-12-31", "2024-01-01", "1"),
    ],
)
def test_days_between_is_end_minus_start(tools, start, end, expected):
    assert call(tools, "calendar", operation="days_between", start=start, end=end) == ToolResult(expected, True)


def test_today_comes_from_the_injected_clock(tools):
    assert call(tools, "calendar", operation="today") == ToolResult("2024-03-15", True)
    at_noon = builtin_tools(today=lambda: datetime.datetime(2030, 1, 2, 12, 0))
    assert call(at_noon, "calendar", operation="today") == ToolResult("2030-01-02", True)


def test_today_defaults_to_the_real_clock():
    before = datetime.date.today().isoformat()
    content = call(builtin_tools(), "calendar", operation="today").content
    assert content in (before, datetime.date.today().isoformat())  # the call may straddle midnight


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"operation": "weekday", "date": "2024-02-30"}, "'2024-02-30' is not a real date"),
        ({"operation": "weekday", "date": "2023-02-29"}, "not a real date"),
        ({"operation": "weekday", "date": "tomorrow"}, "date must be a date written YYYY-MM-DD"),
        ({"operation": "weekday", "date": "2024-3-5"}, "YYYY-MM-DD"),
        ({"operation": "weekday", "date": ""}, "YYYY-MM-DD"),
        ({"operation": "days_between", "start": "2024-01-01", "end": "next week"}, "end must be a date"),
        ({"operation": "days_between", "start": "2024-13-01", "end": "2024-01-01"}, "start '2024-13-01'"),
        ({"operation": "weekday"}, 'needs argument "date"'),
        ({"operation": "days_between", "start": "2024-01-01"}, 'needs argument "end"'),
        ({"operation": "today", "date": "2024-01-01"}, 'does not take "date"'),
        ({"operation": "weekday", "date": "2024-01-01", "end": "2024-01-02"}, 'does not take "end"'),
        ({"operation": "week", "date": "2024-01-01"}, '"operation" of calendar must be one of'),
        ({"date": "2024-01-01"}, 'calendar needs argument "operation"'),
    ],
)
def test_calendar_refuses_bad_dates_and_arguments(tools, arguments, message):
    result = timed_call(tools, "calendar", **arguments)
    assert not result.ok
    assert result.content.startswith("error: ")
    assert message in result.content


# ---------------------------------------------------------------- tool specs


def test_builtin_tools_are_a_calculator_and_a_calendar(tools):
    assert list(tools) == ["calculator", "calendar"]
    for name, tool in tools.items():
        spec = tool.spec()
        assert spec["name"] == name and spec["description"]
        assert spec["parameters"]["type"] == "object"
        assert set(spec["parameters"]["required"]) <= set(spec["parameters"]["properties"])
        json.dumps(spec)  # serializable as is, for the chat template and the API
    assert tools["calculator"].spec()["parameters"]["required"] == ["expression"]
    assert tools["calendar"].spec()["parameters"]["properties"]["operation"]["enum"] == [
        "weekday", "days_between", "today"]


def test_spec_is_a_copy(tools):
    tools["calculator"].spec()["parameters"]["required"].append("x")
    assert tools["calculator"].spec()["parameters"]["required"] == ["expression"]


@pytest.mark.parametrize("name, parameters", [("has space", {"type": "object"}), ("ok", {"type": "array"})])
def test_a_malformed_tool_definition_fails_at_once(name, parameters):
    with pytest.raises(ValueError):
        Tool(name, "bad", parameters, run=lambda arguments: "")


# ---------------------------------------------------------------- run_tool_call


def test_a_call_returns_the_tools_text(tools):
    assert run_tool_call('{"name": "calculator", "arguments": {"expression": "6 * 7"}}', tools) == ToolResult(
        "42", True)


def test_arguments_may_arrive_json_encoded_as_openai_sends_them(tools):
    text = json.dumps({"name": "calculator", "arguments": json.dumps({"expression": "2 ^ 5"})})
    assert run_tool_call(text, tools) == ToolResult("32", True)


def test_missing_null_or_empty_arguments_mean_none(tools):
    for arguments in ('', ', "arguments": null', ', "arguments": ""', ', "arguments": {}'):
        text = '{"name": "calendar"' + arguments + "}"
        assert "operation" in run_tool_call(text, tools).content


@pytest.mark.parametrize(
    "call_json, message",
    [
        ("calculator(2 + 2)", "not valid JSON"),
        ('{"name": "calculator", "arguments": {"expression": 2 + 2}}', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got an array"),
        ('"calculator"', "must be a JSON object, got a string"),
        ('{"arguments": {"expression": "1"}}', 'no "name"'),
        ('{"name": 7, "arguments": {}}', 'no "name"'),
        ('{"name": "search", "arguments": {}}', "unknown tool 'search'; known tools: calculator, calendar"),
        ('{"name": "calculator", "arguments": [1]}', '"arguments" must be a JSON object, got an array'),
        ('{"name": "calculator", "arguments": "{oops"}', '"arguments" is not valid JSON'),
        ('{"name": "calculator", "arguments": "[1]"}', '"arguments" must be a JSON object'),
        ('{"name": "calculator", "arguments": {}}', 'calculator needs argument "expression" (string)'),
        ('{"name": "calculator", "arguments": {"expression": "1", "precision": 3}}',
         'unexpected argument "precision"; its arguments are: expression'),
        ('{"name": "calculator", "arguments": {"expression": 42}}',
         'argument "expression" of calculator must be a string, got a number (42)'),
        ('{"name": "calculator", "arguments": {"expression": ["1"]}}', "must be a string, got an array"),
        ('{"name": "calendar", "arguments": {"operation": true}}', "must be a string, got a boolean"),
        ("[" * 15_000, "nested too deeply"),
        ("1" * 100_000, "at most 20000"),
    ],
)
def test_malformed_calls_name_what_was_wrong(tools, call_json, message):
    start = time.perf_counter()
    result = run_tool_call(call_json, tools)
    assert time.perf_counter() - start < 1.0
    assert not result.ok
    assert result.content.startswith("error: ")
    assert message in result.content


def test_even_a_call_that_is_not_text_does_not_raise(tools):
    result = run_tool_call(None, tools)  # type: ignore[arg-type]
    assert not result.ok and "JSON text" in result.content


def _tool(run) -> dict[str, Tool]:
    return {"probe": Tool("probe", "a test tool", {"type": "object", "properties": {}}, run=run)}


def test_a_tool_that_hangs_is_abandoned_after_the_timeout():
    start = time.perf_counter()
    result = run_tool_call('{"name": "probe"}', _tool(lambda arguments: time.sleep(5) or "late"), timeout=0.2)
    assert time.perf_counter() - start < 1.0
    assert result == ToolResult("error: tool 'probe' gave no result within 0.2 s", False)


def test_a_tool_that_crashes_becomes_an_error_result():
    result = run_tool_call('{"name": "probe"}', _tool(lambda arguments: 1 / 0))
    assert result == ToolResult("error: tool 'probe' failed: ZeroDivisionError: division by zero", False)


def test_a_tool_that_returns_no_text_becomes_an_error_result():
    result = run_tool_call('{"name": "probe"}', _tool(lambda arguments: 42))
    assert not result.ok and "returned int, not text" in result.content


def test_content_is_capped():
    result = run_tool_call('{"name": "probe"}', _tool(lambda arguments: "x" * 10_000))
    assert result.ok and len(result.content) == MAX_RESULT_CHARS and result.content.endswith("(truncated)")


def test_no_tools_at_all_is_said_plainly():
    assert run_tool_call('{"name": "calculator"}', {}).content == "error: unknown tool 'calculator'; known tools: none"


def test_check_arguments_allows_extras_unless_the_schema_forbids_them():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    check_arguments({"n": 3, "extra": "fine"}, schema)
    for bad, message in (({"n": 1.5}, "must be an integer"), ({"n": True}, "got a boolean")):
        with pytest.raises(ToolError, match=message):
            check_arguments(bad, schema)
