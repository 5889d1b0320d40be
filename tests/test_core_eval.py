"""CORE evaluation: task loading, prompt formats, token spans, scoring rules, sharding, the full run."""

import csv
import dataclasses
import os
import random

import pytest
import torch

from nanochat_ray.data.registry import resolve
from nanochat_ray.evals.core import (
    centered_accuracy, continuation_losses, core_results, evaluate_core, evaluate_example,
    evaluate_task, fewshot_indices, load_core_tasks, load_items, render_prompts, select_indices,
    tokenize_prompts, write_results_csv,
)
from nanochat_ray.gpt import GPTConfig, build_gpt
from nanochat_ray.tokenizer import Tokenizer

TINY = GPTConfig(sequence_len=64, vocab_size=1024, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tensors here are tiny: on a busy 2-core machine, intra-op threads spend more time waiting on
    # each other than computing (10x slower fitting measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle(data_root):
    return resolve("core_eval_bundle", "all", data_root)


@pytest.fixture(scope="module")
def tasks(bundle):
    return {task.label: task for task in load_core_tasks(bundle)}


@pytest.fixture(scope="module")
def tokenizer(smoke_tokenizer_dir):
    return Tokenizer.from_directory(smoke_tokenizer_dir)


@pytest.fixture(scope="module")
def random_model():
    # the init zeroes the output projections (every logit equal, every choice tied); perturb all weights
    torch.manual_seed(0)
    model = build_gpt(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def shots(task, k):
    return dataclasses.replace(task, num_fewshot=k)


# -----------------------------------------------------------------------------
# tasks and baselines


def test_core_yaml_and_baselines(tasks):
    assert len(tasks) == 22
    kinds = {label: task.kind for label, task in tasks.items()}
    assert kinds["hellaswag"] == "multiple_choice" and kinds["winograd"] == "schema"
    assert kinds["lambada_openai"] == "language_modeling"
    assert tasks["hellaswag"].num_fewshot == 10 and tasks["hellaswag_zeroshot"].num_fewshot == 0
    assert tasks["arc_easy"].continuation_delimiter == "\nAnswer: "
    assert tasks["copa"].continuation_delimiter == " "
    # the CSV gives percent; the specs hold fractions
    assert tasks["hellaswag"].random_baseline == 0.25
    assert tasks["commonsense_qa"].random_baseline == pytest.approx(0.403)
    assert tasks["boolq"].random_baseline == pytest.approx(0.62)
    assert tasks["jeopardy"].random_baseline == 0.0
    for task in tasks.values():
        assert task.data_path.is_file()


def test_centered_accuracy_with_the_csv_baselines(tasks):
    assert centered_accuracy(0.625, tasks["hellaswag"].random_baseline) == pytest.approx(0.5)
    assert centered_accuracy(0.81, tasks["boolq"].random_baseline) == pytest.approx(0.5)
    assert centered_accuracy(0.3, tasks["lambada_openai"].random_baseline) == pytest.approx(0.3)
    for task in tasks.values():
        assert centered_accuracy(task.random_baseline, task.random_baseline) == pytest.approx(0.0)
        assert centered_accuracy(1.0, task.random_baseline) == pytest.approx(1.0)

    two = [tasks["hellaswag"], tasks["boolq"]]
    results = core_results(two, {"hellaswag": (5, 8), "boolq": (81, 100)})
    assert results["tasks"]["hellaswag"] == {"accuracy": 0.625, "centered": pytest.approx(0.5), "n": 8}
    assert results["core"] == pytest.approx(0.5)


# -----------------------------------------------------------------------------
# prompts


def test_fewshot_draws_exclude_the_item_and_match_sampling_the_other_indices():
    for index in range(5):
        drawn = fewshot_indices(5, index, 4)
        assert sorted(drawn) == [j for j in range(5) if j != index]
    for index in (0, 17, 9999):
        others = [j for j in range(10042) if j != index]
        assert fewshot_indices(10042, index, 10) == random.Random(1234 + index).sample(others, 10)
    assert fewshot_indices(10042, 0, 3) == fewshot_indices(10042, 0, 3)


def test_multiple_choice_prompts_hellaswag(tasks):
    task = shots(tasks["hellaswag"], 1)
    items = load_items(task)
    assert fewshot_indices(len(items), 56, 1) == [5853]
    shot = ("Playing violin: A woman in a black shirt is playing a violin. "
            "She puts the violin down in her lap.\n\n")
    query = "Playing violin: A man is shown playing a violin in front of a video game being played on tv. The man"
    assert render_prompts(task, items, 56) == [
        shot + query + " is then shown playing pool and ends with him speaking to a game reporter.",
        shot + query + " continues playing the instrument while the tv in the background shows a game being played.",
        shot + query + " is seen speaking to the camera as well as signing papers.",
        shot + query + " begins playing a bach and flowers game while looking off into the distance.",
    ]


def test_multiple_choice_prompts_arc_easy_delimiter(tasks):
    task = shots(tasks["arc_easy"], 1)
    prompts = render_prompts(task, load_items(task), 0)
    shot = "Question: The Sun is the largest body in the solar system. The Sun is a ___.\nAnswer: star\n\n"
    query = ("Question: Charles Darwin made a number of observations and inferences during his travels. "
             "He studied island finches during a long period of time. Which statement is an inference?")
    assert prompts[1] == shot + query + "\nAnswer: Island finches have a large number of offspring."
    assert len(prompts) == 4


def test_schema_prompts_winogrande(tasks):
    task = shots(tasks["winogrande"], 1)
    shot = "The gerbil came over to Laura but not Monica because Laura was holding a carrot stick.\n\n"
    assert render_prompts(task, load_items(task), 1) == [
        shot + "The tree fell down sooner than the sapling because the roots of the tree were stronger.",
        shot + "The tree fell down sooner than the sapling because the roots of the sapling were stronger.",
    ]


def test_language_modeling_prompts(tasks):
    task = shots(tasks["bigbench_qa_wikidata"], 2)
    shot = "Latvia shares a border with Russia\n\nThe country of Semois is France\n\n"
    assert render_prompts(task, load_items(task), 29) == [
        shot + "The country of Strait of Dover is",
        shot + "The country of Strait of Dover is France",
    ]
    context = ("“Are you sure you know the way? We’ve only walked it once,” said Carley, starting to stand up too.\n"
               "“Yeah, I’ll be fine. It’s just a couple of streets and I’ll be right back,” I said.\n"
               "“Okay, I guess,” said")
    assert render_prompts(tasks["lambada_openai"], load_items(tasks["lambada_openai"]), 35) == [
        context, context + " Carley"]


# -----------------------------------------------------------------------------
# token spans and truncation


def test_continuation_spans(tasks, tokenizer):
    items = load_items(tasks["lambada_openai"])
    rows = tokenize_prompts(tokenizer, "language_modeling",
                            render_prompts(tasks["lambada_openai"], items, 35), 10_000)
    (tokens, start, end), = rows
    assert tokens[0] == tokenizer.bos_token_id and end == len(tokens)
    assert tokenizer.decode(tokens[start:end]) == " Carley"

    items = load_items(tasks["winograd"])
    rows = tokenize_prompts(tokenizer, "schema", render_prompts(tasks["winograd"], items, 0), 10_000)
    for tokens, start, end in rows:
        assert tokenizer.decode(tokens[start:end]).endswith(" " + items[0]["continuation"])

    items = load_items(tasks["copa"])
    rows = tokenize_prompts(tokenizer, "multiple_choice", render_prompts(tasks["copa"], items, 0), 10_000)
    for (tokens, start, end), choice in zip(rows, items[0]["choices"]):
        # the span starts where the rows first differ: at most the whole choice, always its end
        assert (" " + choice).endswith(tokenizer.decode(tokens[start:end]))
        assert tokens[:start] == rows[0][0][:start]


@pytest.mark.parametrize("label", ["hellaswag", "winograd", "lambada_openai"])
def test_left_truncation_keeps_the_continuation(tasks, tokenizer, label):
    task = tasks[label]
    prompts = render_prompts(task, load_items(task), 3)
    full = tokenize_prompts(tokenizer, task.kind, prompts, 10_000)
    max_len = max(end - start for _, start, end in full) + 5
    cut = tokenize_prompts(tokenizer, task.kind, prompts, max_len)
    for (tokens, start, end), (cut_tokens, cut_start, cut_end) in zip(full, cut):
        assert len(tokens) > max_len  # the prompt really was too long
        assert cut_tokens == tokens[-max_len:]
        assert cut_tokens[cut_start:cut_end] == tokens[start:end]
        assert cut_start >= 1


# -----------------------------------------------------------------------------
# scoring with a model


def fit(tokenizer, texts, steps=200):
    """A tiny GPT trained on the given texts until it has memorised them."""
    torch.manual_seed(0)
    model = build_gpt(TINY)
    rows = tokenizer.encode(texts, prepend=tokenizer.bos_token_id)
    width = max(map(len, rows))
    inputs = torch.full((len(rows), width), tokenizer.bos_token_id)
    targets = torch.full((len(rows), width), -1)
    for r, row in enumerate(rows):
        inputs[r, :len(row)] = torch.tensor(row)
        targets[r, :len(row) - 1] = torch.tensor(row[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(inputs, targets=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    return model


@pytest.fixture(scope="module")
def fitted(tasks, tokenizer):
    """A model fitted on the correct full text of one item of each kind, and those items."""
    picks = {"copa": 0, "winograd": 0, "bigbench_qa_wikidata": 29}
    cases = {}
    for label, index in picks.items():
        task = shots(tasks[label], 0)
        cases[label] = (task, load_items(task), index)
    copa, copa_items, i = cases["copa"]
    wino, wino_items, j = cases["winograd"]
    wiki, wiki_items, k = cases["bigbench_qa_wikidata"]
    texts = [render_prompts(copa, copa_items, i)[copa_items[i]["gold"]],
             render_prompts(wino, wino_items, j)[wino_items[j]["gold"]],
             render_prompts(wiki, wiki_items, k)[1]]
    return fit(tokenizer, texts), cases


def test_multiple_choice_picks_lowest_mean_continuation_loss(fitted, tokenizer):
    model, cases = fitted
    task, items, index = cases["copa"]
    gold = items[index]["gold"]
    rows = tokenize_prompts(tokenizer, task.kind, render_prompts(task, items, index), 64)
    losses = continuation_losses(model, rows, tokenizer.bos_token_id, "cpu")
    assert min(range(len(losses)), key=losses.__getitem__) == gold
    # the batched, padded score equals the mean of this row's own per-token losses
    tokens, start, end = rows[gold]
    ids = torch.tensor([tokens])
    targets = torch.tensor([tokens[1:] + [-1]])
    with torch.no_grad():
        own = model(ids, targets=targets, loss_reduction="none")[0, start - 1:end - 1].mean().item()
    assert losses[gold] == pytest.approx(own, abs=1e-5)

    assert evaluate_example(model, tokenizer, task, items, index, "cpu")
    flipped = [dict(item) for item in items]
    flipped[index]["gold"] = 1 - gold
    assert not evaluate_example(model, tokenizer, task, flipped, index, "cpu")


@pytest.mark.parametrize("label,shots_k", [("hellaswag", 1), ("winogrande", 2)])
def test_shared_prefix_scores_equal_the_full_logits_definition(tasks, tokenizer, label, shots_k):
    """continuation_losses runs the rows' shared prefix once into a KV cache; every row's score must
    equal the plain definition: the whole row alone through the model, full logits, mean cross-entropy
    over the continuation."""
    torch.manual_seed(1)
    model = build_gpt(dataclasses.replace(TINY, sequence_len=512))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    task = shots(tasks[label], shots_k)
    items = load_items(task)
    for index in range(3):
        rows = tokenize_prompts(tokenizer, task.kind, render_prompts(task, items, index), 512)
        # the few-shot examples (and the query) are a prefix of every row: the KV-cache path runs
        assert len(os.path.commonprefix([tokens for tokens, _, _ in rows])) > 20
        fast = continuation_losses(model, rows, tokenizer.bos_token_id, "cpu")
        with torch.no_grad():
            full = []
            for tokens, start, end in rows:
                logits = model(torch.tensor([tokens]))[0]  # (T, vocab): every position's logits
                nll = -torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(tokens) - 1), tokens[1:]]
                full.append(nll[start - 1:end - 1].mean().item())
        assert fast == pytest.approx(full, abs=2e-5)
        assert min(range(len(fast)), key=fast.__getitem__) == min(range(len(full)), key=full.__getitem__)


def test_schema_picks_the_context_that_explains_the_continuation(fitted, tokenizer):
    model, cases = fitted
    task, items, index = cases["winograd"]
    assert evaluate_example(model, tokenizer, task, items, index, "cpu")
    flipped = [dict(item) for item in items]
    flipped[index]["gold"] = 1 - items[index]["gold"]
    assert not evaluate_example(model, tokenizer, task, flipped, index, "cpu")


def test_language_modeling_needs_an_exact_greedy_match(fitted, tokenizer):
    model, cases = fitted
    task, items, index = cases["bigbench_qa_wikidata"]
    assert items[index]["continuation"] == "France"
    assert evaluate_example(model, tokenizer, task, items, index, "cpu")
    changed = [dict(item) for item in items]
    changed[index]["continuation"] = "Belgium"
    assert not evaluate_example(model, tokenizer, task, changed, index, "cpu")


def test_shards_sum_to_the_whole(tasks, tokenizer, random_model):
    for label in ("arc_easy", "winogrande", "squad"):
        task = tasks[label]
        whole = evaluate_task(random_model, tokenizer, task, range(6))
        first, second = (evaluate_task(random_model, tokenizer, task, half) for half in ([0, 1, 2], [3, 4, 5]))
        assert (first[0] + second[0], first[1] + second[1]) == whole
        assert whole[1] == 6


def test_select_indices(tasks):
    assert select_indices(tasks["copa"]) == list(range(100))
    assert select_indices(tasks["copa"], 7) == list(range(7))
    assert select_indices(tasks["copa"], 10_000) == list(range(100))


def test_evaluate_core_on_every_task(bundle, tokenizer, random_model, tmp_path):
    results = evaluate_core(random_model, tokenizer, bundle, max_per_task=2)
    assert len(results["tasks"]) == 22
    for r in results["tasks"].values():
        assert r["n"] == 2 and r["accuracy"] in (0.0, 0.5, 1.0)
    centered = [r["centered"] for r in results["tasks"].values()]
    assert results["core"] == pytest.approx(sum(centered) / 22)
    assert -1.0 <= results["core"] <= 1.0

    path = tmp_path / "core.csv"
    write_results_csv(results, path)
    rows = list(csv.DictReader(open(path)))
    assert [row["task"] for row in rows[:-1]] == list(results["tasks"])
    assert rows[-1]["task"] == "CORE" and float(rows[-1]["centered"]) == pytest.approx(results["core"], abs=1e-6)
    assert rows[-1]["n"] == "44"
