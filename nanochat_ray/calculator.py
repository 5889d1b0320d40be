"""
The calculator behind the model's python tool (SPEC §11), without eval.

The reference runs Python's eval behind a character whitelist and a timeout. Here the
expression is parsed with `ast` and walked by a tiny interpreter that knows only what tool
calls need: int/float literals, + - * / // % **, unary +/-, parentheses, and
`"literal".count("literal")`. Every intermediate value is bounded, so nothing can run long
or allocate much: `9**9**9`, `'a'*10**9` and `__import__('os')` are all refused.

    calculate("12*3+4")                  # "40"
    calculate("48/2")                    # "24"  (integral floats print as ints)
    calculate("'strawberry'.count('r')") # "3"
"""

import ast
import operator
import re

# float64 holds every integer up to 2**53 ≈ 9e15 exactly; beyond that, results stop being exact
MAX_MAGNITUDE = 1e15
MAX_EXPONENT = 100
MAX_STRING = 4_000  # characters in a .count() receiver or argument
MAX_EXPRESSION = 10_000  # characters in the whole expression, before parsing
DECIMALS = 6  # floats are rounded to this many places when printed

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# "1,234" and "1,234,567": a comma between a digit and exactly three digits is a thousands separator
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class CalculatorError(ValueError):
    """The expression is not one the calculator accepts, or its value is out of bounds."""


def calculate(expression: str) -> str:
    """Evaluate a tool-call expression; the result as the model should read it, or CalculatorError."""
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
    expression = expression.strip()
    if "'" not in expression and '"' not in expression:  # commas inside string literals are text
        expression = _THOUSANDS.sub("", expression)
    try:
        tree = ast.parse(expression, mode="eval")
        value = _evaluate(tree.body)
    except CalculatorError:
        raise
    except (SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError) as error:
        raise CalculatorError(f"cannot evaluate {expression[:50]!r}: {error}") from None
    if not isinstance(value, (int, float)):
        raise CalculatorError("the result is not a number")
    return _format(value)


def _evaluate(node: ast.expr) -> int | float | str:
    if isinstance(node, ast.Constant):
        value = node.value
        # bool is an int subclass; True + 1 is not arithmetic a tool call means
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise CalculatorError(f"unsupported literal {value!r}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_number(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        return _checked(_BINARY[type(node.op)](left, right))
    if _is_count_call(node):
        haystack, needle = _evaluate(node.func.value), _evaluate(node.args[0])
        return haystack.count(needle)
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def _is_count_call(node: ast.expr) -> bool:
    # exactly "<str literal>.count(<str literal>)": no names, no keywords, no other methods
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _number(node: ast.expr) -> int | float:
    value = _evaluate(node)
    if isinstance(value, str):
        raise CalculatorError("strings only appear in 'text'.count('x')")
    return value


def _checked(value: int | float | str) -> int | float | str:
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise CalculatorError(f"string longer than {MAX_STRING} characters")
    elif isinstance(value, complex) or not abs(value) <= MAX_MAGNITUDE:  # `not <=` also catches nan
        raise CalculatorError(f"value out of range (|x| <= {MAX_MAGNITUDE:g})")
    return value


def _format(value: int | float) -> str:
    if isinstance(value, float):
        value = round(value, DECIMALS)
        if value.is_integer():  # 48/2 reads "24", as in the training data, not "24.0"
            return str(int(value))
        return f"{value:.{DECIMALS}f}".rstrip("0")  # fixed point: never "5e-05"
    return str(value)
