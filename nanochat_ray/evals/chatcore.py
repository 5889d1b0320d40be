"""
Chat evaluation (SPEC §8): categorical tasks by the offered letters' logits, generative tasks by
sampling and checking, and the ChatCORE summary.

    result = run_task_eval("ARC-Easy", model, tokenizer, range(100), data_root="shared/data")
    result.num_correct, result.num_total, result.accuracy

Plain torch, no Ray. To shard, give each worker some of the example indices and add the results
in the driver, `sum(results, EvalResult())`: exact, because results carry counts, and sampling is
seeded per example, so a sample does not depend on which shard drew it.

Run by: python jobs/chat_eval.py --stage sft (and SFT's quick evals); tested by python -m pytest tests/test_chat_eval.py.
"""

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat_ray.detokenizer import answer_text
from nanochat_ray.engine import Engine
from nanochat_ray.gpt import GPT
from nanochat_ray.tasks import ARC, GSM8K, MMLU, HumanEval, SpellingBee, Task
from nanochat_ray.tokenizer import Tokenizer

# generate(prompt_ids, num_samples, max_tokens, temperature, top_k, seed) → completions' token ids
Generate = Callable[[list[int], int, int, float, int, int], list[list[int]]]

# accuracy of random guessing: 1 in 4 for the 4-choice tasks, 0 for open answers
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
SPELLING_BEE_EVAL_SIZE = 256


@dataclass
class EvalResult:
    num_correct: int = 0
    num_total: int = 0
    # example index → the predicted letter (categorical) or the decoded completions (generative)
    predictions: dict[int, str | list[str]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_total if self.num_total else 0.0

    def __add__(self, other: "EvalResult") -> "EvalResult":
        if self.predictions.keys() & other.predictions.keys():
            raise ValueError("the results share example indices: shards must not overlap")
        return EvalResult(self.num_correct + other.num_correct, self.num_total + other.num_total,
                          {**self.predictions, **other.predictions})

    def record(self, index: int, prediction: str | list[str], correct: bool) -> None:
        self.predictions[index] = prediction
        self.num_correct += int(correct)
        self.num_total += 1


def load_eval_task(name: str, data_root: str | Path | None = None,
                   run_program: Callable[[str], bool] | None = None) -> Task:
    """The evaluation split of a ChatCORE task; `run_program` is HumanEval's sandbox."""
    builders = {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", data_root),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", data_root),
        "MMLU": lambda: MMLU("test", data_root),
        "GSM8K": lambda: GSM8K("test", data_root),
        "HumanEval": lambda: HumanEval(data_root, run_program=run_program),
        "SpellingBee": lambda: SpellingBee(SPELLING_BEE_EVAL_SIZE, "test", data_root=data_root),
    }
    if name not in builders:
        raise ValueError(f"unknown chat eval task {name!r}; known: {sorted(builders)}")
    return builders[name]()


# -----------------------------------------------------------------------------
# categorical


def letter_token_ids(tokenizer: Tokenizer, letters: list[str]) -> list[int]:
    """Each letter's token as the tokenizer encodes it standalone (the first token an answer has)."""
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every answer letter must be one token; {letters} encode as {ids}")
    return [i[0] for i in ids]


@torch.no_grad()
def evaluate_categorical(task: Task, indices: Iterable[int], model: torch.nn.Module, tokenizer: Tokenizer,
                         batch_size: int = 8, autocast_ctx=None) -> EvalResult:
    """Predict each example's letter: the highest logit among ONLY its offered letters, at the
    position after <|assistant_start|>. One forward per batch of prompts, no sampling."""
    device = next(model.parameters()).device
    indices = list(indices)
    result = EvalResult()
    for b in range(0, len(indices), batch_size):
        batch = indices[b:b + batch_size]
        conversations = [task[i] for i in batch]
        # a prompt longer than a GPT's rotary table (10 × its context) keeps its end, where the
        # answer is read (the reference would stop there; only tiny test models get near it)
        limit = getattr(model, "rotary_len", None)
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        prompts = [p[-limit:] if limit else p for p in prompts]
        width = max(len(p) for p in prompts)
        # right padding: causal attention keeps it out of every position we read; any id will do
        pad = tokenizer.bos_token_id
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=device)  # (B, T)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        with autocast_ctx or contextlib.nullcontext():
            hidden = model.hidden_states(ids)[torch.arange(len(batch), device=device), last]  # (B, n_embd)
            answer_logits = model.logits(hidden).cpu()  # (B, vocab): the head at the answer positions only
        for row, (index, conversation) in enumerate(zip(batch, conversations)):
            letters = conversation["letters"]
            offered = answer_logits[row, letter_token_ids(tokenizer, letters)]  # (len(letters),)
            prediction = letters[int(offered.argmax())]
            result.record(index, prediction, task.evaluate(conversation, prediction))
    return result


# -----------------------------------------------------------------------------
# generative


def engine_generate(model: GPT, tokenizer: Tokenizer, autocast_ctx=None) -> Generate:
    """A Generate on the KV-cache engine, calculator tool calls included (GSM8K uses them)."""
    engine = Engine(model, tokenizer)

    def generate(prompt_ids: list[int], num_samples: int, max_tokens: int, temperature: float,
                 top_k: int, seed: int) -> list[list[int]]:
        with autocast_ctx or contextlib.nullcontext():
            sequences, _ = engine.generate_batch(prompt_ids, num_samples, max_tokens=max_tokens,
                                                 temperature=temperature, top_k=top_k or None, seed=seed)
        return [sequence[len(prompt_ids):] for sequence in sequences]

    return generate


def evaluate_generative(task: Task, indices: Iterable[int], tokenizer: Tokenizer, generate: Generate,
                        num_samples: int = 1, max_tokens: int = 512, temperature: float = 0.0,
                        top_k: int = 50, seed: int = 0) -> EvalResult:
    """Sample num_samples completions per example and check them with task.evaluate: pass@k, an
    example counts as correct when any of its samples is."""
    result = EvalResult()
    for index in indices:
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        # seeded by example, so shards draw the same samples; spaced by num_samples for engines
        # that seed sample j with seed + j
        samples = generate(prompt, num_samples, max_tokens, temperature, top_k, seed + index * num_samples)
        # an engine may or may not return the stop token; answer_text cuts at the first either way
        completions = [answer_text(tokenizer, sample) for sample in samples]
        correct = any(task.evaluate(conversation, c) for c in completions)
        result.record(index, completions, correct)
    return result


# -----------------------------------------------------------------------------


def run_task_eval(task_name: str, model: torch.nn.Module, tokenizer: Tokenizer, indices: Iterable[int], *,
                  data_root: str | Path | None = None, generate: Generate | None = None,
                  run_program: Callable[[str], bool] | None = None, batch_size: int = 8,
                  num_samples: int = 1, max_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                  seed: int = 0, autocast_ctx=None) -> EvalResult:
    """Evaluate the given example indices of one ChatCORE task (see load_eval_task for the names).

    Generative tasks sample with `generate` (default: the engine over the model); HumanEval
    needs `run_program`, the sandbox. Indices are positions in the task, e.g. range(len(task)).
    """
    task = load_eval_task(task_name, data_root, run_program)
    if task.eval_type == "categorical":
        return evaluate_categorical(task, indices, model, tokenizer, batch_size, autocast_ctx)
    generate = generate or engine_generate(model, tokenizer, autocast_ctx)
    return evaluate_generative(task, indices, tokenizer, generate, num_samples, max_tokens, temperature, top_k, seed)


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean over the given tasks of (accuracy − baseline) / (1 − baseline): 0 = chance, 1 = perfect."""
    if not accuracies:
        raise ValueError("chatcore needs at least one task's accuracy")
    unknown = set(accuracies) - set(BASELINES)
    if unknown:
        raise ValueError(f"no ChatCORE baseline for {sorted(unknown)}; tasks: {sorted(BASELINES)}")
    centered = [(acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered)
