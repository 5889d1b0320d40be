"""
Multiple-choice tasks: MMLU and ARC (Easy / Challenge), as conversations whose answer is one letter,
in the reference's prompt format:

    user:      "Multiple Choice question: <question>", one "- <choice>=<letter>" line per choice,
               then "Respond only with the letter of the correct answer."
    assistant: "B"

The letter comes after its choice, with no space before it, so the prompt holds the very token
the answer is ("A", not " A"): small models bind choice and letter much better that way.
The conversation also carries `"letters"` (the letters offered, as many as the item has choices):
the categorical eval compares only those letters' logits (SPEC §8).
"""

import string
from pathlib import Path

from nanochat_ray.tasks.base import Task, load_rows


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    lines = [f"Multiple Choice question: {question}"] + [f"- {c}={letter}" for letter, c in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def multiple_choice_conversation(question: str, choices: list[str], answer: int, letters: list[str] | None = None,
                                 **extra) -> dict:
    letters = letters or list(string.ascii_uppercase[:len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": letters[answer]},
        ],
        **extra,
        "letters": letters,
    }


class MultipleChoiceTask(Task):
    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


class MMLU(MultipleChoiceTask):
    """cais/mmlu "all": dev, validation, test; auxiliary_train (hub only) for midtraining."""

    def __init__(self, split: str, data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        rows = load_rows("mmlu", split, data_root, fix=(
            "Without it, midtrain on the rest of the mixture, or on MMLU dev + validation (never test)."))
        # the hub's auxiliary_train parquet nests each row in a single column named "train"
        self.rows = [row["train"] if "train" in row else row for row in rows]

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return multiple_choice_conversation(row["question"], row["choices"], row["answer"],
                                            subject=row.get("subject", ""))


class ARC(MultipleChoiceTask):
    """allenai/ai2_arc, subset "ARC-Easy" or "ARC-Challenge": validation, test; train (hub only)."""

    def __init__(self, subset: str, split: str, data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"unknown ARC subset {subset!r}: ARC-Easy or ARC-Challenge")
        self.rows = load_rows(subset, split, data_root, fix=(
            "Without it, SFT without ARC, or on ARC validation while evaluating on test."))

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        labels = row["choices"]["label"]  # the item's own letters (on the hub a few items use "1".."4")
        return multiple_choice_conversation(row["question"], row["choices"]["text"], labels.index(row["answerKey"]),
                                            letters=labels)
