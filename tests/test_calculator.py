"""The tool calculator: what GSM8K-style calls need works; everything else is refused, quickly."""

import time

import pytest

from nanochat_ray.calculator import CalculatorError, calculate


@pytest.mark.parametrize("expression, expected", [
    ("12*3+4", "40"),
    ("48/2", "24"),  # integral floats print as ints, like the training data's results
    ("(5+3)*2", "16"),
    ("0.5*10", "5"),
    ("10/4", "2.5"),
    ("1/3", "0.333333"),
    ("0.00005*1", "0.00005"),  # fixed point, never 5e-05
    ("7//2", "3"),
    ("7%3", "1"),
    ("2**10", "1024"),
    ("-3+ +5", "2"),
    (" 100 - 2.5 * 4 ", "90"),
    ("1,234+1", "1235"),
    ("1,234,567*2", "2469134"),
    ("'strawberry'.count('r')", "3"),
    ('"a,b,c".count(",")', "2"),  # commas inside strings are text, not separators
    ("10**15", "1000000000000000"),
])
def test_accepts_tool_call_forms(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression", [
    "__import__('os')",
    "__import__('os').system('ls')",
    "x + 1",
    "abs(-3)",
    "(1).real",
    "'abc'.upper()",
    "'abc'.count(x)",
    "'abc'.count('a', 1)",
    "'abc'.count(sub='a')",
    "x.count('a')",
    "lambda: 1",
    "[i for i in range(3)]",
    "(1, 2)",
    "1,23",  # not a thousands separator: a tuple
    "True + 1",
    "1j * 2",
    "1 if 2 else 3",
    "1 < 2",
    "9**9**9",
    "10**101",
    "2**0.5**-1000",
    "'a'*10**9",
    "'a' + 'b'",
    "'" + "a" * 5000 + "'.count('a')",
    "10**16",
    "1e400",
    "(-8)**0.5",
    "1/0",
    "5//0",
    "5%0",
    "0**-1",
    "",
    "1 +",
    "(" * 300 + "1" + ")" * 300,
    "-" * 9000 + "1",
    "9" * 5000,
])
def test_refuses_everything_else_quickly(expression):
    start = time.perf_counter()
    with pytest.raises(CalculatorError):
        calculate(expression)
    assert time.perf_counter() - start < 0.5
