"""A function tool for run_appo.sh (verl's ``multi_turn.function_tool_path``): replace it with
your task's tools. verl infers the tool schema from the signature and the docstring."""

import ast
import operator

from verl.tools.function_tool import function_tool

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.operand))
    raise ValueError("only numbers, + - * / and parentheses")


@function_tool
def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression of numbers, + - * / and parentheses.

    Args:
        expression: The expression, e.g. "(3 + 4) * 2".
    """
    try:
        return str(_value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError) as error:
        return f"error: {error}"
