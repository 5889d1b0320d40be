"""
GSM8K grade-school math (SPEC §7-§9), with the calculator annotations turned into tool calls.

The reference answer "48/2 = <<48/2=24>>24 clips" becomes assistant parts
text "48/2 = ", python "48/2", python_output "24", text "24 clips": the model learns to call
the tool and to read its result (which it is not trained to write). The final "#### N" stays.

Grading is the reference's, exactly (it is also the RL reward): the first "#### " (one space)
followed by digits, signs, dots and commas, commas dropped, compared as strings. "#### 109.0",
"####109" and "#### $109" are wrong answers for 109; a lenient grader would inflate scores.
"""

import re
from pathlib import Path

from nanochat_ray.tasks.base import Task, load_rows

CALCULATOR = re.compile(r"<<([^<>=]*)=([^<>]*)>>")  # <<expression=result>>
FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def extract_answer(text: str) -> str | None:
    """The run of [-0-9.,] after the first "#### ", commas removed ("1,234.5" → "1234.5"); None if absent."""
    match = FINAL_ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


def final_answer_text(conversation: dict) -> str:
    """The last part of the last (assistant) message: where the reference answer's "#### N" is."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def answers_match(completion: str, conversation: dict) -> bool:
    """Whether the completion's "#### N" is, as a string, the reference answer's."""
    got = extract_answer(completion)
    return got is not None and got == extract_answer(final_answer_text(conversation))


def calculator_parts(answer: str) -> list[dict]:
    """Split a GSM8K answer at its <<expr=result>> annotations into text / python / python_output parts."""
    parts = []
    position = 0
    for match in CALCULATOR.finditer(answer):
        if match.start() > position:
            parts.append({"type": "text", "text": answer[position:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        position = match.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


def assistant_text(conversation: dict) -> str:
    """The text parts of the last (assistant) message, joined: where the "#### N" line lives."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


class GSM8K(Task):
    def __init__(self, split: str, data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        self.rows = load_rows("gsm8k", split, data_root)  # shuffled as the reference shuffles

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": calculator_parts(row["answer"])},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(completion, conversation)
