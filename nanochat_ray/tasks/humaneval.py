"""
HumanEval (SPEC §8): 164 Python functions to complete, checked by running their unit tests.

The user message is the function's signature and docstring; the reference answer is the whole
function. Checking a completion means running untrusted code, so it happens in a sandbox that
the caller plugs in: `HumanEval(run_program=...)`, a function from program text to passed / failed.
"""

import re
from collections.abc import Callable
from pathlib import Path

from nanochat_ray.tasks.base import Task, load_rows

# the first fenced block: ```python ... ``` (language tag optional; an unclosed fence runs to the end)
CODE_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a chat completion: its first ``` block if it has one, else all of it."""
    match = CODE_FENCE.search(completion)
    return match.group(1) if match else completion


def humaneval_program(conversation: dict, completion: str) -> str:
    """The program the sandbox runs: prompt + completion + tests + check(entry_point).

    The prompt comes first so a bare function body completes it and its imports are in scope;
    a completion that repeats the whole function simply redefines it.
    """
    code = extract_code(completion)
    return (f"{conversation['prompt']}{code}\n\n{conversation['test']}\n\n"
            f"check({conversation['entry_point']})\n")


class HumanEval(Task):
    def __init__(self, data_root: str | Path | None = None,
                 run_program: Callable[[str], bool] | None = None, **slicing):
        super().__init__(**slicing)
        self.rows = load_rows("humaneval", "test", data_root)
        self.run_program = run_program

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if self.run_program is None:
            raise RuntimeError("HumanEval runs untrusted code: give it a sandbox, HumanEval(run_program=...)")
        return bool(self.run_program(humaneval_program(conversation, completion)))
