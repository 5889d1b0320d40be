"""
Spelling tasks generated from an English word list (SPEC §7-§9), in the reference's formats: tokens
hide letters from the model, so it is taught to spell words out and to count letters, by hand in a
scratchpad and then with a python call.

    SimpleSpelling:  "Spell the word: apple"              → "apple:a,p,p,l,e"
    SpellingBee:     "how many 'r' in strawberry?"        → spelling "strawberry:s,t,r,...", one line
                     per letter ("3:r hit! count=1"), a python 'strawberry'.count('r') call, its
                     output, and "#### 3"

Example i of the train split draws from random.Random(i), of the test split from
random.Random(-(i + 1)) as the reference does; Python seeds with |seed|, so test example i is
train example i + 1 (the reference's overlap, kept for parity).
"""

import functools
import random
import string
from pathlib import Path

from nanochat_ray.data.registry import resolve
from nanochat_ray.tasks.base import SHUFFLE_SEED, Task
from nanochat_ray.tasks.gsm8k import answers_match

# the reference's user-message templates, in its order (the RNG picks by position)
COUNT_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}", "How many times is {letter} in {word}",
    "Number of {letter} in {word}", "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}", "{word} has how many {letter}",
    "In {word}, count the {letter}", "How many {letter} appear in {word}", "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}", "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}", "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?", "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}", "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}", "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
]
QUOTES = ["", "'", '"']
LETTER_IN_WORD = 0.9  # otherwise the letter is any of a-z, so answers of 0 occur too


@functools.cache
def _read_words(path: Path, shuffle: bool) -> tuple[str, ...]:
    words = path.read_text(encoding="utf-8").split()  # one word a line, CRLF endings
    if shuffle:
        random.Random(SHUFFLE_SEED).shuffle(words)
    return tuple(words)


def load_words(data_root: str | Path | None = None, shuffle: bool = False) -> tuple[str, ...]:
    """The word list in file order, or (SimpleSpelling) shuffled by random.Random(42)."""
    return _read_words(resolve("words", "all", data_root), shuffle)


def spelled(word: str) -> str:
    """"apple:a,p,p,l,e": no spaces, so each letter is the same token wherever it appears."""
    return f"{word}:{','.join(word)}"


class _GeneratedTask(Task):
    """`size` examples of a split, "train" or "test"."""

    shuffle_words = False

    def __init__(self, size: int, split: str = "train", data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}: train or test")
        self.size, self.split = size, split
        self.words = load_words(data_root, self.shuffle_words)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else -(index + 1))


class SimpleSpelling(_GeneratedTask):
    shuffle_words = True  # another word order than SpellingBee's

    def example(self, index: int) -> dict:
        word = self.rng(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": spelled(word)},
        ]}


def count_letter_answer(word: str, letter: str) -> list[dict]:
    """The assistant parts answering "how many `letter` in `word`": spell, count letter by letter
    in a scratchpad, check with python, answer after "#### "."""
    lines, count = [], 0
    for position, char in enumerate(word, 1):
        count += char == letter
        # "7:s", never "7: s": " s" would be another token than the "s" of the spelling
        lines.append(f"{position}:{char}" + (f" hit! count={count}" if char == letter else ""))
    scratchpad = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
                  f"first.\n\nFirst spell the word out:\n{spelled(word)}\n\nThen count the occurrences of "
                  f"'{letter}':\n" + "".join(line + "\n" for line in lines) + f"\nThis gives us {count}.")
    return [
        {"type": "text", "text": scratchpad},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


class SpellingBee(_GeneratedTask):
    def example(self, index: int) -> dict:
        rng = self.rng(index)  # the draws below, in this order, are the reference's
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_IN_WORD else rng.choice(string.ascii_lowercase)
        template = rng.choice(COUNT_TEMPLATES)
        if rng.random() < 0.3:  # people who do not use shift
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:  # half of them ask without a question mark
            question += "?"
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": count_letter_answer(word, letter)},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The count after "####" in the completion equals the reference count."""
        return answers_match(completion, conversation)
