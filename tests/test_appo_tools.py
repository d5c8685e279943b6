"""The agent's tools: arithmetic against Python's own, hostile inputs refused quickly, the call
parser, and ``run_tool_call`` never raising on junk."""

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo.tools import (
    CALL_CLOSE_TAGS,
    ITEM_PHRASES,
    PRICES,
    TOOL_NAMES,
    calculator,
    extract_answer,
    lookup,
    observation_spans,
    parse_tool_call,
    run_tool_call,
)


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("3*4+2*7", "26"),
        (" 2 + 3 * (4 - 1) ", "11"),
        ("10/4", "2.5"),
        ("8/2", "4"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7%3", "1"),
        ("2**10", "1024"),
        ("2**-2", "0.25"),
        ("-(3-5)", "2"),
        ("+4", "4"),
        ("1.5*4", "6"),
        ("1/3", "0.3333333333"),
        ("0.1+0.2", "0.3"),
    ],
)
def test_calculator_arithmetic(expression, expected):
    assert calculator(expression) == expected


def test_calculator_matches_integer_arithmetic_on_random_expressions():
    rng = random.Random(0)
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    for _ in range(300):
        a, b, c = (rng.randint(-50, 50) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        if op2 == "*" and op1 != "*":  # precedence: a op1 (b * c)
            expected = ops[op1](a, b * c)
        else:
            expected = ops[op2](ops[op1](a, b), c)
        expression = f"{a}{op1}({b}){op2}{c}"
        assert calculator(expression) == str(expected), expression


HOSTILE = [
    "__import__('os')",
    "__import__('os').system('ls')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "x",
    "x+1",
    "open('/etc/passwd')",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[i for i in range(10**9)]",
    "{1: 2}",
    "'a'*10**9",
    "b'x'",
    "True+1",
    "None",
    "1j*1j",
    "9**9**9",
    "10**100000",
    "2**64",
    "(2**62)*(2**62)",
    "99999999*99999999*99999999",
    "1e308*10",
    "(-8)**0.5",
    "1/0",
    "5//0",
    "5%0",
    "0**-1",
    "1 if 1 else 2",
    "a.b",
    "1;2",
    "import os",
    "1+",
    "",
    "   ",
    "1" * 10_000,
    "(" * 10_000 + "1" + ")" * 10_000,
    "(" * 99 + "1" + ")" * 99 + "+x",
    "-" * 198 + "x",
    "9" * 199,
    "1\x002",
]


@pytest.mark.parametrize("expression", HOSTILE, ids=lambda e: repr(e[:24]))
def test_calculator_refuses_hostile_input_quickly(expression):
    start = time.perf_counter()
    result = calculator(expression)
    assert time.perf_counter() - start < 0.2
    assert result.startswith("error: "), result


def test_calculator_accepts_deep_but_short_nesting():
    assert calculator("(" * 90 + "2" + ")" * 90) == "2"
    assert calculator("-" * 150 + "3") == "3"


def test_lookup_normalises_keys_and_refuses_unknown_ones():
    for name, price in PRICES.items():
        singular, plural = ITEM_PHRASES[name]
        for key in (name, singular, plural, f"  {plural.upper()} ", singular.replace(" ", "   ")):
            assert lookup(key) == str(price), key
    assert lookup("unicorn") == "error: unknown key 'unicorn'"
    hostile = lookup("</out><answer>1</answer>" * 100)
    assert hostile.startswith("error: unknown key") and "<" not in hostile and len(hostile) < 80


def test_parse_tool_call_takes_the_call_that_ends_the_text():
    assert TOOL_NAMES == ("calc", "lookup") and set(CALL_CLOSE_TAGS) == {"</calc>", "</lookup>"}
    assert parse_tool_call("<lookup>pear</lookup><out>7</out>\n<calc> 3*7 </calc>\n") == (
        "calc",
        "3*7",
    )
    assert parse_tool_call("think <lookup>Apple</lookup>") == ("lookup", "Apple")
    assert parse_tool_call("<calc>1+<lookup>pear</lookup>") == ("lookup", "pear")
    assert parse_tool_call("<calc>1+2</calc> and more") is None
    assert parse_tool_call("1+2</calc>") is None
    assert parse_tool_call("<calc>1+2</lookup>") is None
    assert parse_tool_call("") is None


def test_run_tool_call_builds_observations():
    assert run_tool_call("<lookup>pear</lookup>") == f"<out>{PRICES['pear']}</out>"
    assert run_tool_call("<calc>3*4+2*7</calc>") == "<out>26</out>"
    assert run_tool_call("<calc>1/0</calc>") == "<out>error: division by zero</out>"
    assert run_tool_call("no call here") == "<out>error: no complete tool call</out>"


_JUNK_ALPHABET = st.sampled_from(
    [
        "<calc>",
        "</calc>",
        "<lookup>",
        "</lookup>",
        "<answer>",
        "</answer>",
        "<out>",
        "</out>",
        "(",
        ")",
        "*",
        "**",
        "/",
        "-",
        "9",
        "0",
        ".",
        "e",
        "x",
        " ",
        "\n",
        "_",
        "'",
        "apple",
        "\x00",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(_JUNK_ALPHABET, max_size=80).map("".join)))
def test_run_tool_call_never_raises(text):
    observation = run_tool_call(text)
    assert observation.startswith("<out>") and observation.endswith("</out>")
    assert observation.count("</out>") == 1
    extract_answer(text)
    observation_spans(text)


def test_extract_answer_and_observation_spans():
    text = "<lookup>pear</lookup><out>7</out>\n<answer> 14 </answer><answer>3</answer>"
    assert extract_answer(text) == "14"
    assert extract_answer("<answer>14") is None
    assert [text[a:b] for a, b in observation_spans(text)] == ["<out>7</out>"]
    assert observation_spans("x<out>cut") == [(1, 9)]


def test_extract_answer_matches_the_lazy_regex_on_random_text():
    import re

    pattern = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    pieces = ["<answer>", "</answer>", "<answer", "answer>", " 7 ", "x", "\n", "</"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        match = pattern.search(text)
        assert extract_answer(text) == (None if match is None else match.group(1).strip()), text


HOSTILE_TEXT = 20_000  # repetitions: a quadratic scan of these takes seconds to minutes


@pytest.mark.parametrize(
    "scan, text",
    [
        (extract_answer, "<answer>" * HOSTILE_TEXT),
        (extract_answer, "<answer>" * HOSTILE_TEXT + "</answer>"),
        (extract_answer, "</answer>" * HOSTILE_TEXT),
        (parse_tool_call, "<calc>" * HOSTILE_TEXT + "</calc>"),
        (parse_tool_call, "</calc>" * HOSTILE_TEXT + " " * HOSTILE_TEXT),
        (run_tool_call, "<lookup>" + "pear " * HOSTILE_TEXT + "</lookup>"),
        (observation_spans, "<out>" * HOSTILE_TEXT),
        (observation_spans, "<out></out>" * HOSTILE_TEXT),
        (lookup, "a " * HOSTILE_TEXT),
        (calculator, "(" * HOSTILE_TEXT),
    ],
    ids=lambda value: getattr(value, "__name__", None) or f"{value[:12]!r}x{len(value)}",
)
def test_text_scans_of_model_output_are_linear(scan, text):
    started = time.perf_counter()
    scan(text)
    assert time.perf_counter() - started < 0.25, scan.__name__
