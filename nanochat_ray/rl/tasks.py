"""
What RL samples and how it scores it: a list of conversations (the last message is the reference
answer, never shown to the model) and reward(conversation, completion) -> float.

- GSM8K (SPEC §10): reward 1.0 when the completion's "#### N" equals the reference's, else 0.
- SevenToy: "Answer with the number 7", reward 1.0 when the answer contains the number 7. A
  plumbing check: a fresh model (uniform over the vocabulary) hits it by chance in a few percent
  of its samples, enough for the group advantage to pull it up within ten steps, so a run that
  does not raise this reward has a broken loop, not a weak model.
"""

import re
from pathlib import Path
from typing import Protocol

from nanochat_ray.tasks import GSM8K

SEVEN = re.compile(r"(?<!\d)7(?!\d)")


class RewardTask(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...

    def reward(self, conversation: dict, completion: str) -> float: ...


class GSM8KReward:
    """GSM8K conversations; 1.0 when the final number is right."""

    def __init__(self, split: str, data_root: str | Path | None = None):
        self.task = GSM8K(split, data_root)

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> dict:
        return self.task[index]

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.task.evaluate(conversation, completion))


class SevenToy:
    """`size` copies of one question; reward 1.0 when the answer holds the number 7 (not 17 or 70)."""

    QUESTION = "Answer with the number 7."

    def __init__(self, split: str = "train", data_root: str | Path | None = None, size: int = 1000):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"SevenToy index {index} out of range (length {self.size})")
        return {"messages": [{"role": "user", "content": self.QUESTION}, {"role": "assistant", "content": "7"}]}

    def reward(self, conversation: dict, completion: str) -> float:
        return float(SEVEN.search(completion) is not None)


TASKS = {"gsm8k": GSM8KReward, "toy": SevenToy}


def load_reward_task(name: str, split: str, data_root: str | Path | None = None) -> RewardTask:
    if name not in TASKS:
        raise ValueError(f"unknown RL task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](split, data_root)
