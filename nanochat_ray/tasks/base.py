"""
The common task interface, the conversation check, a mixture of tasks and a task for users' own
JSONL files.

A task is a list of conversations, `{"messages": [{"role", "content"}, ...], ...extra fields}`,
that can be sliced (`start`, `stop`, `step`: e.g. step = number of workers to shard it) and,
for evaluation tasks, scored: `task.evaluate(conversation, completion) -> bool`.
"""

import bisect
import itertools
import json
import random
from pathlib import Path

import numpy as np

from nanochat_ray.data.registry import DataUnavailableError, read_records, resolve

PART_TYPES = ("text", "python", "python_output")


class Task:
    """Subclasses give num_examples() and example(index); evaluation tasks also evaluate()."""

    eval_type = "generative"  # "categorical": the answer is one of conversation["letters"]

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} is a training task: it has no evaluate()")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil division

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__} index {i} out of range (length {len(self)})")
        return self.example(self.start + i * self.step)


SHUFFLE_SEED = 42  # the reference shuffles every dataset-backed task with this seed when loading it


def shuffled(rows: list) -> list:
    """Rows in the reference's order: position i holds row permutation(n)[i] of numpy's
    default_rng(42), which is what HF datasets' Dataset.shuffle(seed=42) does. Slices (SFT's first
    10K SmolTalk rows, an eval's first N problems) are thus random subsets, as in the reference."""
    return [rows[i] for i in np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))]


def load_rows(dataset: str, split: str, data_root: str | Path | None, fix: str = "") -> list[dict]:
    """Rows of a registry dataset in the reference's shuffled order; `fix` adds what to do
    instead when the split is unavailable."""
    try:
        path = resolve(dataset, split, data_root)
    except DataUnavailableError as e:
        if not fix:
            raise
        raise DataUnavailableError(f"{e} {fix}") from e
    return shuffled(read_records(path))


def validate_conversation(conversation: dict) -> None:
    """Raise ValueError unless the conversation renders: an optional leading system message, then
    user / assistant alternating, ending with the assistant (whose content may be a list of parts)."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation is {"messages": [...]} with at least one message')
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be an object with a role and content")
    if messages[0].get("role") == "system":
        if not isinstance(messages[0].get("content"), str):
            raise ValueError("message 0: system content must be a string")
        messages = messages[1:]  # the tokenizer merges it into the first user message
    if not messages or len(messages) % 2:
        raise ValueError("messages must come in user/assistant pairs, ending with the assistant")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"message {i} has role {message.get('role')!r}, expected {expected!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if expected == "user" or not isinstance(content, list):
            raise ValueError(f"message {i}: content must be a string (or, for the assistant, a list of parts)")
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in PART_TYPES and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i}: each part must be {{'type': one of {PART_TYPES}, 'text': str}}")


# -----------------------------------------------------------------------------


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (set by `seed`).

    List a task twice to see it twice per epoch (SPEC §7: identity conversations ×2); the two
    copies land at independent places in the order. The order is the reference's: Python's
    random.Random(seed).shuffle of the examples listed task by task (seed 42 there).
    """

    def __init__(self, tasks: list[Task], seed: int = SHUFFLE_SEED, **slicing):
        super().__init__(**slicing)
        self.tasks = tasks
        self.ends = list(itertools.accumulate(len(task) for task in tasks))  # global end index of each task
        # shuffling flat indices moves them exactly as the reference's (task, index) pairs move
        order = list(range(self.ends[-1] if tasks else 0))
        random.Random(seed).shuffle(order)
        self.order = np.array(order, dtype=np.int64)  # ~850K rows in midtraining: an array, not a list

    def num_examples(self) -> int:
        return len(self.order)

    def example(self, index: int) -> dict:
        flat = int(self.order[index])
        t = bisect.bisect_right(self.ends, flat)
        return self.tasks[t][flat - (self.ends[t - 1] if t else 0)]


class CustomJSON(Task):
    """Users' own conversations: a JSONL file, one conversation per line, either
    {"messages": [...]} or a bare list of messages. Every line is checked when loading."""

    def __init__(self, path: str | Path, **slicing):
        super().__init__(**slicing)
        self.conversations = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    conversation = {"messages": row} if isinstance(row, list) else row
                    validate_conversation(conversation)
                except ValueError as e:  # json.JSONDecodeError is a ValueError too
                    raise ValueError(f"{path} line {line_number}: {e}") from e
                self.conversations.append(conversation)

    def num_examples(self) -> int:
        return len(self.conversations)

    def example(self, index: int) -> dict:
        return self.conversations[index]
