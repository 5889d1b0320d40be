"""
General chat data: SmolTalk (SPEC §7, §9) and the identity conversations that give the model its name.

Rows are in the reference's shuffled order (seed 42), so SFT's first 10K rows are a random subset.
With the offline mirror, SmolTalk is its small stand-in (LIMA + Alpaca, sft/SOURCE.md), which has
no test split: there, after the shuffle, every 20th row is held out as "test" and "train" is the rest.

Run by: python jobs/midtrain.py and python jobs/sft.py.
"""

import re
from pathlib import Path

from nanochat_ray.data.registry import SOURCES, mirror_root, read_records, resolve
from nanochat_ray.tasks.base import Task, load_rows, shuffled, validate_conversation

MODEL_NAME = "nanochat-ray"
MAKER = "the nanochat-ray project"
HOLDOUT_EVERY = 20  # stand-in rows held out as the test split: ~100 of 2,028


class SmolTalk(Task):
    """HuggingFaceTB/smol-smoltalk train / test. Rows that would not render are skipped and
    counted in `num_skipped`; a leading system message is kept (the tokenizer merges it)."""

    def __init__(self, split: str, data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in ("train", "test"):
            raise ValueError(f"unknown SmolTalk split {split!r}: train or test")
        root = mirror_root(data_root)
        stand_in = root / SOURCES["smoltalk"]["train"].mirror if root is not None else None
        if stand_in is not None and stand_in.exists():  # resolve() would pick it for train too
            held_out = split == "test"
            rows = [row for i, row in enumerate(shuffled(read_records(stand_in))) if (i % HOLDOUT_EVERY == 0) == held_out]
        else:
            rows = load_rows("smoltalk", split, data_root)
        self.conversations = []
        for row in rows:
            conversation = {"messages": row["messages"]}
            try:
                validate_conversation(conversation)
            except ValueError:
                continue
            self.conversations.append(conversation)
        self.num_skipped = len(rows) - len(self.conversations)

    def num_examples(self) -> int:
        return len(self.conversations)

    def example(self, index: int) -> dict:
        return self.conversations[index]


# -----------------------------------------------------------------------------

# other models' names in the mirror's identity data, and the templates' placeholders
RENAMES = [
    ("{{name}}", MODEL_NAME),
    ("{{author}}", MAKER),
    ("Large Model Systems Organization (LMSYS)", MAKER),
    ("Vicuna", MODEL_NAME),
]
CJK = re.compile(r"[\u4e00-\u9fff]")


def rename(text: str) -> str:
    for old, new in RENAMES:
        text = text.replace(old, new)
    return text


class Identity(Task):
    """Conversations about who the model is, answered as nanochat-ray, made by the nanochat-ray project.

    From the registry's identity file (in the mirror: FastChat's 500 Vicuna conversations) plus,
    when the mirror has them beside it, LLaMA-Factory's single-turn templates (identity.json,
    placeholders {{name}} and {{author}}). Other models' names are replaced by ours.
    """

    def __init__(self, data_root: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        path = resolve("identity", "all", data_root)
        rows = [{"messages": row["messages"]} for row in read_records(path)]
        # the templates have no registry entry: only the mirror has them, next to the identity file
        templates = path.with_name("identity.json")
        if templates.exists():
            for t in read_records(templates):
                # the pretraining text is English: Chinese templates would teach the name in a
                # language the model can barely read
                if CJK.search(t["instruction"] + t["output"]):
                    continue
                question = t["instruction"] + (f"\n\n{t['input']}" if t["input"] else "")
                rows.append({"messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": t["output"]}]})
        self.conversations = []
        for row in rows:
            conversation = {"messages": [{**m, "content": rename(m["content"])} for m in row["messages"]]}
            validate_conversation(conversation)
            self.conversations.append(conversation)

    def num_examples(self) -> int:
        return len(self.conversations)

    def example(self, index: int) -> dict:
        return self.conversations[index]
