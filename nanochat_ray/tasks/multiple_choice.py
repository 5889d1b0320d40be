"""
Multiple-choice tasks: MMLU and ARC (Easy / Challenge), as conversations whose answer is one letter.

    user:      the question, then "A. ...", "B. ...", one line per choice, then an instruction
    assistant: "B"

The conversation also carries `"letters"` (the letters offered, as many as the item has choices):
the categorical eval compares only those letters' logits (SPEC §8).
"""

import string
from pathlib import Path

from nanochat_ray.tasks.base import Task, load_rows


def multiple_choice_conversation(question: str, choices: list[str], answer: int) -> dict:
    letters = list(string.ascii_uppercase[:len(choices)])
    lines = [question.strip(), ""]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters)})."]
    return {
        "messages": [
            {"role": "user", "content": "\n".join(lines)},
            {"role": "assistant", "content": letters[answer]},
        ],
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
        conversation = multiple_choice_conversation(row["question"], row["choices"], row["answer"])
        conversation["subject"] = row.get("subject", "")
        return conversation


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
        # letters by position: a few items label their choices "1".."4" instead of "A".."D"
        labels = row["choices"]["label"]
        return multiple_choice_conversation(row["question"], row["choices"]["text"], labels.index(row["answerKey"]))
