"""
The CORE metric (SPEC §6, from the DCLM paper): 22 in-context-learning tasks scored by a base
model's losses, each accuracy centered on its random baseline, CORE = their mean.

Three task kinds, all decided by one forward pass over every variant of an item at once:
- multiple_choice: one query, several continuations (the choices); the choice whose tokens
  have the lowest mean loss is the prediction.
- schema: several contexts, one continuation; the context under which the continuation has
  the lowest mean loss is the prediction.
- language_modeling: the greedy (argmax) prediction must equal every continuation token.

Few-shot examples come before the item, each rendered like an item with its correct answer and
followed by a blank line; they are drawn with a fixed seed per item, never the item itself.

    bundle = resolve("core_eval_bundle", "all", data_root)   # nanochat_ray.data.registry
    results = evaluate_core(model, tokenizer, bundle, max_per_task=500)
    write_results_csv(results, "core.csv")

To spread the work: `select_indices` per task, `evaluate_task` on shards of those indices,
sum the (correct, total) counts per label, then `core_results`.
"""

import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from nanochat_ray.gpt import KVCache, head_loss, kv_cache_dtype, matmul_dtype
from nanochat_ray.tokenizer import Tokenizer

SHUFFLE_SEED = 1337  # the reference shuffles each task once, so "the first N" is a random subset
FEWSHOT_SEED = 1234  # item i draws its few-shot examples with random.Random(FEWSHOT_SEED + i)
KINDS = ("multiple_choice", "schema", "language_modeling")


@dataclass(frozen=True)
class TaskSpec:
    label: str  # e.g. "hellaswag_zeroshot"; the key into eval_meta_data.csv
    kind: str  # one of KINDS
    data_path: Path  # the task's jsonl file
    num_fewshot: int  # examples placed before each item
    continuation_delimiter: str  # between context and continuation
    random_baseline: float  # accuracy of guessing, as a fraction (the CSV has percent)


def load_core_tasks(bundle_dir: str | Path) -> list[TaskSpec]:
    """The tasks of core.yaml, in its order, with their baselines from eval_meta_data.csv."""
    bundle_dir = Path(bundle_dir)
    config = yaml.safe_load((bundle_dir / "core.yaml").read_text())
    with open(bundle_dir / "eval_meta_data.csv", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for entry in config["icl_tasks"]:
        if entry["icl_task_type"] not in KINDS:
            raise ValueError(f"{entry['label']}: unknown icl_task_type {entry['icl_task_type']!r}")
        if len(entry["num_fewshot"]) != 1:
            raise ValueError(f"{entry['label']}: expected one num_fewshot value, got {entry['num_fewshot']}")
        tasks.append(TaskSpec(
            label=entry["label"],
            kind=entry["icl_task_type"],
            data_path=bundle_dir / "eval_data" / entry["dataset_uri"],
            num_fewshot=entry["num_fewshot"][0],
            continuation_delimiter=entry.get("continuation_delimiter", " "),
            random_baseline=baselines[entry["label"]],
        ))
    return tasks


def load_items(task: TaskSpec) -> list[dict]:
    """A task's rows in evaluation order: shuffled with a fixed seed, as the reference does
    (several files are sorted by category, so their first rows are not a fair sample)."""
    with open(task.data_path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items


def select_indices(task: TaskSpec, max_per_task: int | None = None) -> list[int]:
    """The items evaluated: all, or the first `max_per_task` of the shuffled order."""
    n = len(load_items(task))
    return list(range(n if max_per_task is None else min(n, max_per_task)))


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at chance, 1 at perfect; both arguments are fractions."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


# -----------------------------------------------------------------------------
# prompts


def fewshot_indices(num_items: int, index: int, k: int) -> list[int]:
    """k distinct items other than `index`, the same for every call with these arguments."""
    rng = random.Random(FEWSHOT_SEED + index)
    # sample positions among the n-1 other items, then step over `index`: the same draws as
    # sampling from the explicit list of other indices, without building it for each item
    return [j + (j >= index) for j in rng.sample(range(num_items - 1), k)]


def render_prompts(task: TaskSpec, items: list[dict], index: int) -> list[str]:
    """The texts scored for one item: one per choice (multiple_choice), one per context option
    (schema), or [context, context + continuation] (language_modeling)."""
    item, d = items[index], task.continuation_delimiter
    examples = [items[j] for j in fewshot_indices(len(items), index, task.num_fewshot)]
    if task.kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in examples)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in examples)
        return [f"{shots}{context}{d}{item['continuation']}" for context in item["context_options"]]
    # contexts may carry stray whitespace at either end; strip so the context alone tokenizes
    # as a clean prefix of context + continuation
    shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in examples)
    context = f"{shots}{item['context'].strip()}{d}"
    return [context.strip(), context + item["continuation"]]


# -----------------------------------------------------------------------------
# tokens


def _common_prefix_len(rows: list[list[int]]) -> int:
    n = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        n += 1
    return n


def tokenize_prompts(tokenizer: Tokenizer, kind: str, prompts: list[str],
                     max_len: int) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per scored row, BOS first, where tokens[start:end] is the
    continuation. Rows longer than max_len lose tokens from the left (the context end and
    the continuation are what matter); start stays ≥ 1 so every scored token has a predecessor."""
    encoded = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id)
    if kind == "multiple_choice":
        # the choices begin where the rows stop agreeing
        prefix = _common_prefix_len(encoded)
        spans = [(min(prefix, len(row) - 1), len(row)) for row in encoded]
    elif kind == "schema":
        # the shared continuation is the longest common suffix
        suffix = _common_prefix_len([row[::-1] for row in encoded])
        spans = [(len(row) - min(suffix, len(row) - 1), len(row)) for row in encoded]
    else:
        # only the full text is scored; the context alone marks where the continuation starts
        context, full = encoded
        encoded, spans = [full], [(_common_prefix_len([context, full]), len(full))]

    rows = []
    for tokens, (start, end) in zip(encoded, spans):
        crop = max(0, len(tokens) - max_len)
        rows.append((tokens[crop:], max(start - crop, 1), end - crop))
    return rows


# -----------------------------------------------------------------------------
# scoring


def _batch(rows: list[tuple[list[int], int, int]], pad_id: int, device) -> torch.Tensor:
    # right padding: with causal attention, tokens after a row's end cannot change its scores
    ids = torch.full((len(rows), max(len(tokens) for tokens, _, _ in rows)), pad_id, dtype=torch.long)
    for r, (tokens, _, _) in enumerate(rows):
        ids[r, :len(tokens)] = torch.tensor(tokens)
    return ids.to(device)


@torch.no_grad()
def continuation_losses(model: torch.nn.Module, rows: list[tuple[list[int], int, int]],
                        pad_id: int, device: torch.device | str) -> list[float]:
    """Mean loss (nats) of each row's continuation tokens, all rows in one forward pass.

    The rows of an item share a long prefix (the few-shot examples, the question) and differ
    only near the end: the prefix runs once, batch 1, into a KV cache, and only the rest of each
    row runs on top of it (4-11x fewer tokens on the multiple-choice tasks). Causal attention
    makes that the same computation; the floats differ from a whole-row forward only in
    rounding (tests/test_core_eval.py compares the two on the full-logits definition).
    """
    # positions before `shared` read the same tokens in every row and are never scored (the
    # first scored position, start - 1, predicts the first continuation token)
    shared = min(_common_prefix_len([tokens for tokens, _, _ in rows]), min(start for _, start, _ in rows) - 1)
    cache = None
    if len(rows) > 1 and shared > 0:
        c = model.config
        weight = model.lm_head.weight
        dtype = kv_cache_dtype(weight.device, matmul_dtype(weight))  # as the engine's cache
        prefix = KVCache(1, c.n_kv_head, c.head_dim, c.n_layer, shared, device, dtype)
        model.hidden_states(torch.tensor([rows[0][0][:shared]], device=device), kv_cache=prefix)
        cache = KVCache(len(rows), c.n_kv_head, c.head_dim, c.n_layer, max(len(t) for t, _, _ in rows), device, dtype)
        cache.prefill_from(prefix)
        rows = [(tokens[shared:], start - shared, end - shared) for tokens, start, end in rows]
    ids = _batch(rows, pad_id, device)  # (B, T)
    targets = torch.roll(ids, shifts=-1, dims=1)  # position t predicts t+1
    scored = torch.zeros_like(ids, dtype=torch.bool)
    for r, (_, start, end) in enumerate(rows):
        scored[r, start - 1:end - 1] = True
    # the head runs at the continuation's positions only: the context's logits are never needed
    hidden = model.hidden_states(ids, kv_cache=cache)[scored]  # (scored positions, n_embd), row by row
    losses = head_loss(hidden, model.lm_head.weight, targets[scored], reduction="none")
    means = [part.mean() for part in losses.split([end - start for _, start, end in rows])]
    return torch.stack(means).tolist()  # one device sync for all rows


@torch.no_grad()
def evaluate_example(model: torch.nn.Module, tokenizer: Tokenizer, task: TaskSpec, items: list[dict],
                     index: int, device: torch.device | str) -> bool:
    """Whether the model gets items[index] right."""
    prompts = render_prompts(task, items, index)
    rows = tokenize_prompts(tokenizer, task.kind, prompts, model.config.sequence_len)
    if task.kind == "language_modeling":
        tokens, start, end = rows[0]
        hidden = model.hidden_states(_batch(rows, tokenizer.bos_token_id, device))  # (1, T, n_embd)
        predicted = model.logits(hidden[0, start - 1:end - 1]).argmax(dim=-1)  # only the continuation's logits
        return predicted.tolist() == tokens[start:end]
    losses = continuation_losses(model, rows, tokenizer.bos_token_id, device)
    predicted = min(range(len(losses)), key=losses.__getitem__)  # the first of equal losses
    return predicted == items[index]["gold"]


def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, task: TaskSpec,
                  indices: list[int]) -> tuple[int, int]:
    """(correct, total) over the given items: counts, so shards add up exactly."""
    items = load_items(task)
    device = next(model.parameters()).device
    indices = list(indices)
    correct = sum(evaluate_example(model, tokenizer, task, items, i, device) for i in indices)
    return correct, len(indices)


def core_results(tasks: list[TaskSpec], counts: dict[str, tuple[int, int]]) -> dict:
    """{"tasks": {label: {"accuracy", "centered", "n"}}, "core": mean centered accuracy}
    from each task's summed (correct, total)."""
    per_task = {}
    for task in tasks:
        correct, total = counts[task.label]
        accuracy = correct / total
        per_task[task.label] = {"accuracy": accuracy, "n": total,
                                "centered": centered_accuracy(accuracy, task.random_baseline)}
    core = sum(r["centered"] for r in per_task.values()) / len(per_task)
    return {"tasks": per_task, "core": core}


def evaluate_core(model: torch.nn.Module, tokenizer: Tokenizer, bundle_dir: str | Path,
                  max_per_task: int | None = None) -> dict:
    """Every CORE task in one process; see core_results for the returned dict."""
    tasks = load_core_tasks(bundle_dir)
    counts = {}
    for task in tasks:
        t0 = time.time()
        counts[task.label] = evaluate_task(model, tokenizer, task, select_indices(task, max_per_task))
        correct, total = counts[task.label]
        print(f"CORE {task.label}: {correct}/{total} in {time.time() - t0:.1f}s", flush=True)
    return core_results(tasks, counts)


def write_results_csv(results: dict, path: str | Path) -> None:
    """One row per task, then a CORE row (its n: the items evaluated over all tasks)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "accuracy", "centered", "n"])
        for label, r in results["tasks"].items():
            writer.writerow([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}", r["n"]])
        total = sum(r["n"] for r in results["tasks"].values())
        writer.writerow(["CORE", "", f"{results['core']:.6f}", total])
