"""
Spelling tasks generated from an English word list (SPEC §7-§9): tokens hide letters from the
model, so it is taught to spell words out and to count letters with a python call.

    SimpleSpelling:  "Spell the word: apple"              → "apple: a, p, p, l, e"
    SpellingBee:     "How many r are in strawberry?"      → spelling, positions, a python
                     'strawberry'.count('r') call, its output, and "#### 3"

Example i of a split is drawn from its own RNG (seeded by split, seed and i), so any slice or
shard of a task sees the same examples, and train and test draw independent streams.
"""

import functools
import random
import string
from pathlib import Path

from nanochat_ray.data.registry import resolve
from nanochat_ray.tasks.base import Task
from nanochat_ray.tasks.gsm8k import answers_match, assistant_text

SPELL_PROMPTS = [
    "Spell the word: {word}",
    "How do you spell {word}?",
    "Spell out {word} letter by letter.",
    "Can you spell \"{word}\" for me?",
]
COUNT_PROMPTS = [
    "How many {letter} are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the letter '{letter}' in the word \"{word}\".",
    "How many '{letter}'s are there in {word}?",
]
LETTER_IN_WORD = 0.9  # otherwise the letter is any of a-z, so answers of 0 occur too


@functools.cache
def _read_words(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split()  # one word a line, CRLF endings


def load_words(data_root: str | Path | None = None) -> list[str]:
    return _read_words(resolve("words", "all", data_root))


class _GeneratedTask(Task):
    """`size` examples of a split ("train" or "test"); `seed` picks another stream of them."""

    def __init__(self, size: int, split: str = "train", seed: int = 0,
                 data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}: train or test")
        self.size, self.split, self.seed = size, split, seed
        self.words = load_words(data_root)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        # string seeds hash deterministically (sha512), unlike hash() of a tuple
        return random.Random(f"{type(self).__name__}/{self.split}/{self.seed}/{index}")


class SimpleSpelling(_GeneratedTask):
    def example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        return {"messages": [
            {"role": "user", "content": rng.choice(SPELL_PROMPTS).format(word=word)},
            {"role": "assistant", "content": f"{word}: {', '.join(word)}"},
        ]}


def count_letter_answer(word: str, letter: str) -> list[dict]:
    """The assistant parts answering "how many `letter` in `word`": spell, point, check in python."""
    count = word.count(letter)
    positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
    reasoning = f"Let me spell out \"{word}\": {', '.join(word)}.\n"
    if positions:
        where = "position" + ("s" if count > 1 else "") + " " + ", ".join(positions)
        reasoning += f"The letter '{letter}' is at {where}, so I count {count}.\n"
    else:
        reasoning += f"The letter '{letter}' does not appear in it, so I count 0.\n"
    reasoning += "Let me double-check with Python:\n"
    return [
        {"type": "text", "text": reasoning},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nBoth agree: \"{word}\" has {count} '{letter}'.\n\n#### {count}"},
    ]


class SpellingBee(_GeneratedTask):
    def example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_IN_WORD else rng.choice(string.ascii_lowercase)
        return {"messages": [
            {"role": "user", "content": rng.choice(COUNT_PROMPTS).format(letter=letter, word=word)},
            {"role": "assistant", "content": count_letter_answer(word, letter)},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The count after "####" in the completion equals the reference count."""
        return answers_match(completion, assistant_text(conversation))
