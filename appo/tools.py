"""The agent's tools and its tool-call format.

The format is short and regular so that a small model learns it from a few demonstrations::

    <lookup>apple</lookup><out>4</out>
    <lookup>pear</lookup><out>7</out>
    <calc>3*4+2*7</calc><out>26</out>
    <answer>26</answer>

* The model writes a call, ``<calc>EXPR</calc>`` or ``<lookup>KEY</lookup>``, and stops at the
  closing tag (``CALL_CLOSE_TAGS`` are the stop strings of generation).
* The environment appends the observation ``<out>RESULT</out>`` (or ``<out>error: ...</out>``)
  right after the closing tag, with nothing in between; ``run_tool_call`` builds it. Observation
  tokens are environment text: the trainer masks them out of the loss.
* The model then writes a newline and either another call or the final ``<answer>VALUE</answer>``,
  which ends the episode (``ANSWER_CLOSE_TAG``).

``calculator`` evaluates arithmetic by walking the ``ast`` of the expression: numeric literals,
unary ``+ -``, binary ``+ - * / // % **`` and parentheses only. Input length, the magnitude of
every intermediate result and exponents are bounded, so no input can hang it or exhaust memory.
No ``eval``, ``exec`` or shell is involved. ``lookup`` reads a small embedded price table.
"""

from __future__ import annotations

import ast
import math
import operator
import re

TOOL_NAMES = ("calc", "lookup")
CALL_CLOSE_TAGS = ("</calc>", "</lookup>")
ANSWER_OPEN_TAG = "<answer>"
ANSWER_CLOSE_TAG = "</answer>"
OBSERVATION_OPEN = "<out>"
OBSERVATION_CLOSE = "</out>"

MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**15  # every intermediate and final result stays below this
MAX_EXPONENT = 64

# Unit prices in whole dollars, and the singular / plural phrases that questions use for each item.
# ``lookup`` accepts the item name or either phrase, in any case and spacing.
PRICES: dict[str, int] = {
    "apple": 4,
    "pear": 7,
    "banana": 2,
    "orange": 5,
    "lemon": 3,
    "mango": 9,
    "peach": 6,
    "plum": 2,
    "melon": 8,
    "kiwi": 3,
    "egg": 1,
    "bread": 5,
    "cheese": 9,
    "milk": 3,
    "tea": 6,
    "coffee": 8,
    "rice": 4,
    "soap": 2,
    "candle": 6,
    "pencil": 1,
    "pen": 3,
    "notebook": 5,
    "stamp": 2,
    "ticket": 9,
    "towel": 7,
    "cup": 4,
    "plate": 6,
    "spoon": 2,
    "fork": 2,
    "lamp": 8,
}
_MEASURED = {
    "bread": ("loaf", "loaves"),
    "cheese": ("piece", "pieces"),
    "milk": ("bottle", "bottles"),
    "tea": ("box", "boxes"),
    "coffee": ("bag", "bags"),
    "rice": ("bag", "bags"),
    "soap": ("bar", "bars"),
}
ITEM_PHRASES: dict[str, tuple[str, str]] = {
    name: (f"{_MEASURED[name][0]} of {name}", f"{_MEASURED[name][1]} of {name}")
    if name in _MEASURED
    else (name, name + ("es" if name.endswith("ch") else "s"))
    for name in PRICES
}
_KEY_ALIASES = {
    phrase: name for name, phrases in ITEM_PHRASES.items() for phrase in (name, *phrases)
}

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class ToolError(ValueError):
    """A tool input that the tool refuses; its message becomes the error observation."""


def _bounded(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise ToolError("complex result")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result is not finite")
    if abs(value) >= MAX_ABS_VALUE:
        raise ToolError("result too large")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent too large (|exponent| <= {MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise ToolError("division by zero")
    # |base| ** exponent must stay below MAX_ABS_VALUE; checked in logs before computing it.
    if base != 0 and exponent * math.log10(abs(base)) >= math.log10(MAX_ABS_VALUE):
        raise ToolError("result too large")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, complex, str, bytes, None, ...
            raise ToolError("only numbers are allowed")
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = _evaluate(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        return _bounded(_BINARY_OPS[type(node.op)](left, right))
    raise ToolError(f"unsupported syntax ({type(node).__name__})")


def format_number(value: int | float) -> str:
    """Canonical text of a number: integral values as integers (``4.0`` -> ``4``), other floats
    with up to 10 significant digits (``12.5``, ``0.3333333333``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value)
    return format(value, ".10g")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression; returns the result text or ``"error: ..."``."""
    if not isinstance(expression, str):
        return "error: expression must be text"
    expression = expression.strip()
    if not expression:
        return "error: empty expression"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(expression, mode="eval")
        return format_number(_evaluate(tree.body))
    except ToolError as err:
        return f"error: {err}"
    except (SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return "error: invalid expression"


def normalize_key(key: str) -> str:
    return " ".join(key.lower().split())


def lookup(key: str) -> str:
    """Unit price (whole dollars) of an item; returns the value text or ``"error: ..."``."""
    if not isinstance(key, str):
        return "error: key must be text"
    name = _KEY_ALIASES.get(normalize_key(key))
    if name is None:
        shown = re.sub(r"[^a-z0-9 ]", "", normalize_key(key))[:32]
        return f"error: unknown key '{shown}'"
    return str(PRICES[name])


_TOOLS = {"calc": calculator, "lookup": lookup}


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """The tool call that ``text`` ends with (trailing whitespace allowed), as ``(tool, argument)``;
    None when the text does not end with a complete call."""
    if not isinstance(text, str):
        return None
    text = text.rstrip()
    for tool in TOOL_NAMES:
        close = f"</{tool}>"
        if text.endswith(close):
            start = text.rfind(f"<{tool}>", 0, len(text) - len(close))
            if start == -1:
                return None
            return tool, text[start + len(tool) + 2 : len(text) - len(close)].strip()
    return None


def run_tool_call(text: str) -> str:
    """Run the call that ``text`` ends with; returns the observation ``<out>...</out>``.

    Never raises: a missing or malformed call, or a refused input, gives ``<out>error: ...</out>``.
    """
    call = parse_tool_call(text)
    if call is None:
        result = "error: no complete tool call"
    else:
        tool, argument = call
        try:
            result = _TOOLS[tool](argument)
        except Exception:  # a tool bug must not kill a rollout; it becomes an observation
            result = "error: tool failed"
    return f"{OBSERVATION_OPEN}{result}{OBSERVATION_CLOSE}"


def extract_answer(text: str) -> str | None:
    """The content of the first complete ``<answer>...</answer>`` (stripped), or None.

    Two ``str.find`` calls, linear in ``len(text)``: the first opening tag that has a closing tag
    after it is the first opening tag (a later one cannot have a closing tag the first lacks).
    """
    if not isinstance(text, str):
        return None
    start = text.find(ANSWER_OPEN_TAG)
    if start == -1:
        return None
    start += len(ANSWER_OPEN_TAG)
    end = text.find(ANSWER_CLOSE_TAG, start)
    return None if end == -1 else text[start:end].strip()


def observation_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the observations in ``text`` (environment text that a
    trainer excludes from the loss)."""
    spans = []
    start = text.find(OBSERVATION_OPEN)
    while start != -1:
        end = text.find(OBSERVATION_CLOSE, start)
        end = len(text) if end == -1 else end + len(OBSERVATION_CLOSE)
        spans.append((start, end))
        start = text.find(OBSERVATION_OPEN, end)
    return spans
