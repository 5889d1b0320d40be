"""Tasks (SPEC §7-§9): every task renders into valid conversations, on the real mirror data."""

import json
import time

import pytest

from nanochat_ray.data import registry
from nanochat_ray.data.registry import DataUnavailableError, Source, read_records
from nanochat_ray.tasks import (
    ARC, GSM8K, MMLU, CustomJSON, HumanEval, Identity, SimpleSpelling, SmolTalk, SpellingBee,
    TaskMixture, extract_answer, extract_code, humaneval_program, validate_conversation,
)
from nanochat_ray.tasks.base import Task, shuffled
from nanochat_ray.tasks.humaneval import prompt_imports
from nanochat_ray.tasks.spelling import count_letter_answer
from nanochat_ray.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smoke_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_directory(smoke_tokenizer_dir)


@pytest.fixture(scope="module")
def tasks(data_root) -> dict[str, Task]:
    return {
        "gsm8k": GSM8K("train", data_root),
        "mmlu": MMLU("dev", data_root),
        "arc_easy": ARC("ARC-Easy", "validation", data_root),
        "arc_challenge": ARC("ARC-Challenge", "test", data_root),
        "smoltalk": SmolTalk("train", data_root),
        "identity": Identity(data_root),
        "simple_spelling": SimpleSpelling(50, data_root=data_root),
        "spelling_bee": SpellingBee(50, data_root=data_root),
        "humaneval": HumanEval(data_root),
    }


def expected_mask(ids: list[int], tok: Tokenizer) -> list[int]:
    """The mask from the token stream alone: 1 inside assistant turns (its end token too), except
    the assistant_start token and python output blocks."""
    special = {name: tok.encode_special(name) for name in
               ("<|assistant_start|>", "<|assistant_end|>", "<|output_start|>", "<|output_end|>")}
    mask, in_assistant, in_output = [], False, False
    for t in ids:
        if t == special["<|assistant_start|>"]:
            mask.append(0)
            in_assistant = True
        elif t == special["<|output_start|>"]:
            in_output = True
            mask.append(0)
        elif t == special["<|output_end|>"]:
            in_output = False
            mask.append(0)
        else:
            mask.append(int(in_assistant and not in_output))
            if t == special["<|assistant_end|>"]:
                in_assistant = False
    return mask


@pytest.mark.parametrize("name", ["gsm8k", "mmlu", "arc_easy", "arc_challenge", "smoltalk", "identity",
                                  "simple_spelling", "spelling_bee", "humaneval"])
def test_every_task_renders_with_masks(name, tasks, tok):
    task = tasks[name]
    assert len(task) > 0
    for i in sorted({0, 1, len(task) // 2, len(task) - 1}):
        conversation = task[i]
        validate_conversation(conversation)
        ids, mask = tok.render_conversation(conversation, max_tokens=100_000)
        assert ids[0] == tok.bos_token_id and len(ids) == len(mask)
        assert mask == expected_mask(ids, tok)
        assert sum(mask) > 0
        assert tok.render_for_completion(conversation)[-1] == tok.encode_special("<|assistant_start|>")


def test_python_output_is_not_trained(tasks, tok):
    ids, mask = tok.render_conversation(tasks["spelling_bee"][0])
    start, end = ids.index(tok.encode_special("<|output_start|>")), ids.index(tok.encode_special("<|output_end|>"))
    assert set(mask[start:end + 1]) == {0}
    python_start = ids.index(tok.encode_special("<|python_start|>"))
    assert mask[python_start] == 1  # the model writes the tool call


def test_task_slicing(tasks, data_root):
    sliced = GSM8K("train", data_root, start=10, stop=20, step=3)
    assert len(sliced) == 4  # 10, 13, 16, 19
    assert [sliced[i] for i in range(4)] == [tasks["gsm8k"][j] for j in (10, 13, 16, 19)]
    with pytest.raises(IndexError):
        sliced[4]
    assert len(SimpleSpelling(10, start=8, stop=50, data_root=data_root)) == 2  # stop clipped to the size
    with pytest.raises(ValueError, match="bad slice"):
        SimpleSpelling(10, step=0, data_root=data_root)


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_calculator_calls(tasks):
    index = next(i for i, row in enumerate(tasks["gsm8k"].rows) if row["question"].startswith("Natalia sold"))
    row = tasks["gsm8k"].rows[index]
    parts = tasks["gsm8k"][index]["messages"][1]["content"]
    assert parts[:4] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
    ]
    assert parts[-1]["type"] == "text" and parts[-1]["text"].endswith("#### 72")
    # the parts put back together with their annotations give the original answer
    rebuilt = "".join(f"<<{p['text']}=" if p["type"] == "python" else
                      f"{p['text']}>>" if p["type"] == "python_output" else p["text"] for p in parts)
    assert rebuilt == row["answer"]


@pytest.mark.parametrize("text, answer", [  # the reference's rule: "#### " then [-0-9.,]+, commas dropped
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### -12", "-12"),
    ("#### 3.75", "3.75"),
    ("#### 1,234,567", "1234567"),
    ("#### 1,000.50.", "1000.50."),  # the full stop is part of the run: a wrong answer for 1000.50
    ("#### $1,000", None),
    ("####42", None),
    ("the answer is 42", None),
    ("#### forty-two", None),
    ("#### 5\n#### 6", "5"),  # the first one counts
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_gsm8k_evaluate(tasks):
    gsm8k = tasks["gsm8k"]
    conversation = next(gsm8k[i] for i in range(len(gsm8k))
                        if gsm8k[i]["messages"][1]["content"][-1]["text"].endswith("#### 72"))
    assert gsm8k.evaluate(conversation, "Altogether 72 clips.\n#### 72")
    assert not gsm8k.evaluate(conversation, "#### 72.0")  # strings compare, as in the reference
    assert not gsm8k.evaluate(conversation, "#### 73")
    assert not gsm8k.evaluate(conversation, "The answer is 72.")  # no ####: not an answer
    big = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 1,200"}]}
    assert gsm8k.evaluate(big, "#### 1200") and gsm8k.evaluate(big, "#### 1,200")


# -----------------------------------------------------------------------------
# multiple choice


def test_mmlu_and_arc_letters(tasks):
    index = next(i for i, row in enumerate(tasks["mmlu"].rows) if row["choices"] == ["0", "1", "2", "3"])
    mmlu = tasks["mmlu"][index]
    assert mmlu["letters"] == ["A", "B", "C", "D"]
    assert mmlu["messages"][1]["content"] == "ABCD"[tasks["mmlu"].rows[index]["answer"]]
    assert "\n- 0=A\n- 1=B\n- 2=C\n- 3=D\n\nRespond only" in mmlu["messages"][0]["content"]
    arc = tasks["arc_easy"]
    assert {len(arc[i]["letters"]) for i in range(len(arc))} == {3, 4, 5}  # as many as the item has
    numeric = next(i for i, row in enumerate(arc.rows) if row["choices"]["label"][0] == "1")
    row, conversation = arc.rows[numeric], arc[numeric]
    assert conversation["letters"] == ["1", "2", "3", "4"]  # the item's own labels, as in the reference
    assert conversation["messages"][1]["content"] == row["answerKey"]
    assert arc.eval_type == "categorical"
    assert arc.evaluate(conversation, conversation["messages"][1]["content"] + " ")
    assert not arc.evaluate(conversation, "5")


def test_missing_split_is_a_clear_error(data_root, monkeypatch):
    # no network in tests: the hub address becomes a refused port, and the retries don't wait
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    refused = Source(("http://127.0.0.1:9/split.parquet",), None)
    monkeypatch.setitem(registry.SOURCES["mmlu"], "auxiliary_train", refused)
    with pytest.raises(DataUnavailableError) as info:
        MMLU("auxiliary_train", data_root)
    message = str(info.value)
    assert "auxiliary_train" in message and "lacks this split" in message
    assert "--data-root" in message and "MMLU dev + validation" in message
    monkeypatch.setitem(registry.SOURCES["ARC-Easy"], "train", refused)
    with pytest.raises(DataUnavailableError, match="'train'.*SFT without ARC"):
        ARC("ARC-Easy", "train", data_root)
    with pytest.raises(ValueError, match="unknown dataset/split"):
        GSM8K("dev", data_root)


# -----------------------------------------------------------------------------
# chat data


def test_smoltalk_stand_in_holds_out_a_test_split(tasks, data_root):
    train, test = tasks["smoltalk"], SmolTalk("test", data_root)
    rows = read_records(data_root / "sft" / "sft_messages.jsonl")
    assert train.num_skipped == test.num_skipped == 0  # single-turn user/assistant rows, all valid
    rows = shuffled(rows)  # the reference's order first
    assert test.conversations == [{"messages": r["messages"]} for r in rows[::20]]  # every 20th row
    assert len(train) + len(test) == len(rows) == 2028
    assert train[0]["messages"] == rows[1]["messages"] and train[19]["messages"] == rows[21]["messages"]


def test_identity_uses_our_name(tasks):
    text = "\n".join(m["content"] for c in tasks["identity"].conversations for m in c["messages"])
    assert "I am nanochat-ray" in text and "the nanochat-ray project" in text
    for other in ("Vicuna", "LMSYS", "{{name}}", "{{author}}"):
        assert other not in text
    assert len(tasks["identity"]) > 500  # FastChat's 500 plus LLaMA-Factory's English templates


def test_validate_conversation():
    good = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}
    validate_conversation(good)
    bad = [
        ({"messages": []}, "at least one"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "pairs"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'user'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}]},
         "each part"),
        ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}, "string"),
    ]
    for conversation, reason in bad:
        with pytest.raises(ValueError, match=reason):
            validate_conversation(conversation)


def test_custom_json(tmp_path, tok):
    path = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "nanochat-ray"}]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = CustomJSON(path)
    assert len(task) == 2 and task[1]["messages"] == rows[1]
    ids, mask = tok.render_conversation(task[0])
    assert mask == expected_mask(ids, tok)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": rows[1][:1]}) + "\n")
    with pytest.raises(ValueError, match="mine.jsonl line 2: .*pairs"):
        CustomJSON(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        CustomJSON(path)


# -----------------------------------------------------------------------------
# spelling


@pytest.mark.parametrize("word, letter, count", [("strawberry", "r", 3), ("banana", "a", 3),
                                                 ("mississippi", "s", 4), ("apple", "z", 0)])
def test_count_letter_answer(word, letter, count):
    parts = count_letter_answer(word, letter)
    assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
    assert parts[2]["text"] == f"'{word}'.count('{letter}')"
    assert eval(parts[2]["text"]) == count and parts[3]["text"] == str(count)  # a real python call
    assert extract_answer(parts[4]["text"]) == str(count)
    assert f"{word}:{','.join(word)}" in parts[0]["text"] and parts[0]["text"].count(" hit! ") == count


def test_spelling_bee_on_real_words(tasks, data_root):
    bee = tasks["spelling_bee"]
    for i in range(len(bee)):
        conversation = bee[i]
        python = conversation["messages"][1]["content"][2]["text"]  # 'word'.count('l')
        word, letter = python.split("'")[1], python.split("'")[3]
        count = word.count(letter)
        assert word in conversation["messages"][0]["content"]
        assert bee.evaluate(conversation, f"So the answer is\n#### {count}")
        assert not bee.evaluate(conversation, f"#### {count + 1}")
    assert {bee[i]["messages"][1]["content"][3]["text"] for i in range(len(bee))} >= {"0", "1", "2"}
    # each example has its own seed: a slice sees the same examples; test example i is train
    # example i + 1 (random.Random(-(i + 1)) seeds as random.Random(i + 1)), as in the reference
    assert SpellingBee(50, data_root=data_root, start=7)[0] == bee[7]
    assert SpellingBee(50, "test", data_root=data_root)[0] == bee[1] != bee[0]


def test_simple_spelling(tasks):
    spelling = tasks["simple_spelling"]
    for i in range(len(spelling)):
        user, assistant = (m["content"] for m in spelling[i]["messages"])
        word, letters = assistant.split(":")
        assert user == f"Spell the word: {word}" and letters.split(",") == list(word)


# -----------------------------------------------------------------------------
# HumanEval


def test_humaneval_program_runs_the_tests(tasks, data_root):
    humaneval = tasks["humaneval"]
    conversation = humaneval[0]
    assert {"test", "entry_point"} <= conversation.keys()
    prompt, solution = conversation["messages"][0]["content"], humaneval.rows[0]["canonical_solution"]

    def run(program: str) -> bool:  # in-process stand-in for the sandbox: this is our own code
        try:
            exec(program, {})
            return True
        except (AssertionError, SyntaxError):
            return False

    sandboxed = HumanEval(data_root, run_program=run)
    assert sandboxed.evaluate(conversation, prompt + solution)
    assert sandboxed.evaluate(conversation, f"Here you go:\n```python\n{prompt}{solution}```\nDone.")
    assert not sandboxed.evaluate(conversation, solution)  # a bare body is not a program (the reference's rule)
    assert not sandboxed.evaluate(conversation, prompt + "    return not True\n")
    with pytest.raises(RuntimeError, match="sandbox"):
        humaneval.evaluate(conversation, solution)
    program = humaneval_program(conversation, prompt + solution)
    assert program.startswith(prompt_imports(prompt) + "\n\n" + (prompt + solution).strip())
    assert program.endswith(f"\ncheck({conversation['entry_point']})")


@pytest.mark.parametrize("completion, code", [
    ("def f():\n    return 1\n", "def f():\n    return 1"),
    ("Sure:\n```python\ndef f():\n    return 1\n```\nThat's it.", "def f():\n    return 1"),
    ("```\nx = 1\n```", "x = 1"),
    ("```python\nx = 1\n", "```python\nx = 1"),  # unclosed fence: not a block, the whole completion
    ("```python\na = 1\n```\n```python\nb = 2\n```", "a = 1"),  # the first block
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


# -----------------------------------------------------------------------------
# mixture


def test_mixture_is_a_deterministic_shuffle(tasks, data_root):
    identity, spelling = tasks["identity"], SimpleSpelling(300, data_root=data_root)
    mix = TaskMixture([identity, identity, spelling], seed=42)
    assert len(mix) == 2 * len(identity) + len(spelling)
    order = [mix[i] for i in range(len(mix))]
    assert order == [TaskMixture([identity, identity, spelling], seed=42)[i] for i in range(len(mix))]
    assert order != [TaskMixture([identity, identity, spelling], seed=43)[i] for i in range(len(mix))]
    # every example exactly as often as listed: identity twice, spelling once
    seen = [json.dumps(c, sort_keys=True) for c in order]
    expected = [json.dumps(t[i], sort_keys=True) for t in (identity, identity, spelling) for i in range(len(t))]
    assert sorted(seen) == sorted(expected)
    assert order[:len(identity)] != [identity[i] for i in range(len(identity))]  # shuffled, not concatenated
    # sharding by step gives disjoint pieces that cover the mixture
    shards = [TaskMixture([identity, identity, spelling], seed=42, start=r, step=2) for r in range(2)]
    assert sum(len(s) for s in shards) == len(mix)
    assert shards[1][5] == mix[11]
