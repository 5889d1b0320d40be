"""
Evaluations sharded over Ray actors: each actor loads the model once, evaluates the example
indices it is given, and returns counts; the driver adds them up. Because every evaluation
returns counts and generative sampling is seeded per example, N actors give exactly the
numbers of one process.

    actors = start_eval_actors("sft", "d20", num_actors=8, use_gpu=True)
    progress = Progress(evals_dir() / "chat_sft_d20.progress.json", {"model": label, ...})
    run_core(actors, bundle_dir, max_per_task=500, progress=progress)
    run_chat(actors, ["ARC-Easy", "GSM8K"], data_root, max_per_task=None, progress=progress)

Crashes cost little: an actor whose process dies is restarted by Ray (it reloads the model) and
its unfinished calls are retried (MAX_RESTARTS); every finished task's counts are written to the
progress file at once, so a re-run of the same evaluation skips them (the file goes when the
final results are saved).
"""

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from nanochat_ray.checkpoint import build_model_from_checkpoint, checkpoint_dir, latest_step
from nanochat_ray.common import add_verbose_flag, autocast, base_dir, compute_dtype, default_device, write_atomic
from nanochat_ray.config import Config, ConfigError, add_config_args
from nanochat_ray.evals import core
from nanochat_ray.evals.bpb import evaluate_bpb
from nanochat_ray.evals.chat import EvalResult, chatcore, load_eval_task, run_task_eval
from nanochat_ray.gpt import build_gpt
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.train.loop import sample_greedy, to_batch


def check_checkpoint(stage: str, cfg: Config, root: Path | None = None, allow_untrained: bool = False) -> None:
    """An error naming what was looked for when the stage has no checkpoint: scoring a random model
    by accident wastes an evaluation and reads like a result."""
    directory = checkpoint_dir(stage, cfg.model_tag, root)
    if latest_step(directory) is None and not allow_untrained:
        raise ConfigError(f"no {stage} checkpoint of {cfg.model_tag} in {directory}: train that stage first, pass the "
                          f"--preset/--depth it was trained with (or NANOCHAT_BASE_DIR of its artifact root), or "
                          f"--allow-untrained to evaluate a freshly initialised model on purpose")


def load_model(stage: str, cfg: Config, device: torch.device, root: Path | None = None,
               allow_untrained: bool = False) -> tuple[torch.nn.Module, str]:
    """The stage's latest checkpoint; a freshly initialised model, clearly labelled, only when
    allow_untrained (otherwise a missing checkpoint is a ConfigError)."""
    check_checkpoint(stage, cfg, root, allow_untrained)
    if latest_step(checkpoint_dir(stage, cfg.model_tag, root)) is None:
        torch.manual_seed(cfg.seed)
        return build_gpt(cfg.gpt_config(), device), f"UNTRAINED {cfg.model_tag} (no {stage} checkpoint)"
    model, meta = build_model_from_checkpoint(stage, cfg.model_tag, device=device, root=root)
    return model, f"{stage} {cfg.model_tag} step {meta['step']}"


class Evaluator:
    """One model copy and a tokenizer; evaluates the indices it is handed."""

    def __init__(self, stage: str, cfg: Config, tokenizer_dir: str, data_root: str | None, root: str | None,
                 allow_untrained: bool = False):
        # Ray gives an actor as many threads as CPUs it reserved; a plain process keeps torch's default
        self.device = default_device()
        self.model, self.label = load_model(stage, cfg, self.device, Path(root) if root else None, allow_untrained)
        self.model.eval()
        self.cfg = cfg
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)
        self.data_root = data_root
        self.autocast = autocast(self.device, compute_dtype(cfg.dtype, self.device))

    def describe(self) -> str:
        return self.label

    def bpb(self, shard: str) -> float:
        """Bits per byte on the first cfg.eval_tokens tokens of a pretraining shard."""
        from nanochat_ray.train.pretrain import val_rows
        rows = val_rows(shard, self.tokenizer, self.cfg, rank=0, world_size=1)
        batches = [to_batch(rows[i:i + self.cfg.device_batch_size], self.device)
                   for i in range(0, len(rows), self.cfg.device_batch_size)]
        return evaluate_bpb(self.model, batches, self.tokenizer.token_bytes(), self.autocast)

    def samples(self, prompts: list[str], max_tokens: int = 16) -> dict[str, str]:
        """Greedy continuations of the fixed prompts."""
        return {prompt: self.tokenizer.decode(sample_greedy(
                    self.model, self.tokenizer.encode(prompt, prepend="<|bos|>"), max_tokens))
                for prompt in prompts}

    def core(self, task: core.TaskSpec, indices: list[int]) -> tuple[int, int]:
        with torch.inference_mode(), self.autocast:
            return core.evaluate_task(self.model, self.tokenizer, task, indices)

    def chat(self, task_name: str, indices: list[int], **options) -> EvalResult:
        from nanochat_ray.evals.sandbox import run_program
        with torch.inference_mode():
            return run_task_eval(task_name, self.model, self.tokenizer, indices, data_root=self.data_root,
                                 run_program=lambda code: run_program(code).success,
                                 autocast_ctx=self.autocast, **options)


# an actor whose process dies (OOM kill, lost node, segfault) comes back with the model reloaded,
# and the calls it had not finished run again; every call is a pure function of its arguments
MAX_RESTARTS = 3
EvalActor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(Evaluator)


class Progress:
    """Finished tasks' results of one evaluation, on disk as they finish, so a re-run after a
    crash resumes instead of starting over. `key` holds what the results depend on (model, step,
    settings): a file written under another key is ignored and replaced."""

    def __init__(self, path: Path | None, key: dict):
        self.path, self.key, self.done = path, key, {}
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                saved = {}  # a file of someone else's making: start over
            if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("done"), dict):
                self.done = saved["done"]
                if self.done:
                    print(f"resuming: {len(self.done)} task(s) already evaluated in {path}", flush=True)

    def record(self, name: str, result: Any) -> Any:
        self.done[name] = result
        if self.path is not None:
            write_atomic(self.path, json.dumps({"key": self.key, "done": self.done}, indent=2))
        return result

    def get_or_run(self, name: str, compute: Callable[[], Any]) -> Any:
        return self.done[name] if name in self.done else self.record(name, compute())

    def finish(self) -> None:
        """The final results are saved: the progress file has served its purpose."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def start_eval_actors(stage: str, cfg: Config, tokenizer_dir: Path, data_root: str | None, num_actors: int,
                      use_gpu: bool = False, cpus_per_actor: float = 1.0, root: Path | None = None,
                      allow_untrained: bool = False) -> list:
    check_checkpoint(stage, cfg, root, allow_untrained)  # here, before any actor starts
    options = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_actor}
    return [EvalActor.options(**options).remote(stage, cfg, str(tokenizer_dir), data_root, str(root) if root else None,
                                                allow_untrained)
            for _ in range(num_actors)]


def _shards(indices: list[int], n: int) -> list[list[int]]:
    return [indices[i::n] for i in range(n) if indices[i::n]]


def run_core(actors: list, bundle_dir: Path, max_per_task: int | None, progress: Progress | None = None) -> dict:
    """CORE over the actors: every task's indices dealt round-robin, counts summed per task;
    tasks already in `progress` are not run again, finished ones are recorded there."""
    progress = progress or Progress(None, {})
    tasks = core.load_core_tasks(bundle_dir)
    pending = {task.label: [actor.core.remote(task, shard) for actor, shard in
                            zip(actors, _shards(core.select_indices(task, max_per_task), len(actors)))]
               for task in tasks if f"core/{task.label}" not in progress.done}
    counts = {}
    for task in tasks:
        label = task.label
        if label in pending:
            parts = ray.get(pending[label])
            progress.record(f"core/{label}", [sum(c for c, _ in parts), sum(t for _, t in parts)])
        counts[label] = tuple(progress.done[f"core/{label}"])
        print(f"  {label:<40} {counts[label][0]:>5}/{counts[label][1]:<5}", flush=True)
    return core.core_results(tasks, counts)


def run_chat(actors: list, task_names: list[str], data_root: str | None, max_per_task: int | None,
             progress: Progress | None = None, **options) -> dict:
    """Chat evals over the actors; returns per-task accuracy and ChatCORE over the tasks run.
    Tasks already in `progress` are not run again, finished ones are recorded there."""
    progress = progress or Progress(None, {})
    pending = {}
    for name in task_names:
        if f"chat/{name}" in progress.done:
            continue
        n = len(load_eval_task(name, data_root))
        indices = list(range(n if max_per_task is None else min(n, max_per_task)))
        pending[name] = [actor.chat.remote(name, shard, **options)
                         for actor, shard in zip(actors, _shards(indices, len(actors)))]
    accuracies = {}
    for name in task_names:
        if name in pending:
            result = sum(ray.get(pending[name]), EvalResult())
            progress.record(f"chat/{name}", [result.num_correct, result.num_total])
        correct, total = progress.done[f"chat/{name}"]
        accuracies[name] = correct / total if total else 0.0
        print(f"  {name:<15} {correct:>5}/{total:<5} {accuracies[name]:.4f}", flush=True)
    return {"tasks": accuracies, "chatcore": chatcore(accuracies)}


# -----------------------------------------------------------------------------
# what the evaluation jobs share


def eval_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-actors", type=int, default=1, help="evaluation actors (one per GPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--allow-untrained", action="store_true",
                        help="evaluate a freshly initialised model when the stage has no checkpoint (default: error)")
    parser.add_argument("--max-per-task", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA"),
                        help="local mirror laid out like shared/data (env NANOCHAT_DATA)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: <base dir>/tokenizer")
    add_config_args(parser)
    add_verbose_flag(parser)
    return parser


def evals_dir() -> Path:
    path = base_dir() / "evals"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_results(results: dict, name: str) -> Path:
    """<base dir>/evals/<name>.json, written atomically: a reader never sees half a file.

    With Ray running, every number in `results` also goes to the dashboard's metrics as
    nanochat_eval_result{eval=name, metric="core_tasks/arc_easy", ...}.
    """
    path = evals_dir() / f"{name}.json"
    write_atomic(path, json.dumps(results, indent=2))
    if ray.is_initialized():
        from ray.util.metrics import Gauge

        gauge = Gauge("nanochat_eval_result", description="evaluation results (accuracy, CORE, bpb)",
                      tag_keys=("eval", "metric"))
        for metric, value in numeric_leaves(results):
            gauge.set(value, tags={"eval": name, "metric": metric})
    return path


def numeric_leaves(results: dict, prefix: str = "") -> list[tuple[str, float]]:
    """("tasks/GSM8K", 0.04), ... for every number in a nested dict of results (not the texts)."""
    leaves = []
    for key, value in results.items():
        if isinstance(value, dict):
            leaves += numeric_leaves(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            leaves.append((f"{prefix}{key}", float(value)))
    return leaves
