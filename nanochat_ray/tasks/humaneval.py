"""
HumanEval (SPEC §8): 164 Python functions to complete, checked by running their unit tests.

The user message is the function's signature and docstring; the reference answer is the whole
function (prompt, a newline, canonical solution), which is what a completion must give. Checking a completion means running untrusted code, so it happens in a sandbox that
the caller plugs in: `HumanEval(run_program=...)`, a function from program text to passed / failed.
"""

import re
from collections.abc import Callable
from pathlib import Path

from nanochat_ray.tasks.base import Task, load_rows

# the first ```python or bare ``` fenced block, closed on a line of its own
CODE_FENCE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a chat completion: its first fenced block if it has one, else all of it; stripped."""
    match = CODE_FENCE.search(completion)
    return (match.group(1) if match else completion).strip()


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (blank and comment lines skipped), stripped."""
    imports = []
    for line in prompt.split("\n"):
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def humaneval_program(conversation: dict, completion: str) -> str:
    """The program the sandbox runs, assembled as the reference grader does: the prompt's imports,
    the completion's code, the tests, check(entry_point). Only the imports are prepended (not the
    prompt): the completion must hold the whole function, so a bare body fails, as it does there."""
    return (f"{prompt_imports(conversation['messages'][0]['content'])}\n\n{extract_code(completion)}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})")


class HumanEval(Task):
    def __init__(self, data_root: str | Path | None = None,
                 run_program: Callable[[str], bool] | None = None, **slicing):
        super().__init__(**slicing)
        self.rows = load_rows("humaneval", "test", data_root)  # shuffled as the reference shuffles
        self.run_program = run_program

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "task_id": row["task_id"],
            "test": row["test"],
            "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if self.run_program is None:
            raise RuntimeError("HumanEval runs untrusted code: give it a sandbox, HumanEval(run_program=...)")
        return bool(self.run_program(humaneval_program(conversation, completion)))
