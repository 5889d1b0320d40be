"""
Evaluating one model in one process, Ray-free: load a stage's checkpoint (or, on request, a
fresh model), then score bits per byte, greedy samples, CORE tasks and chat tasks on the example
indices it is handed; keep finished tasks' results on disk (Progress) so a crashed evaluation
resumes. evals/actors.py runs Evaluators as Ray actors and shards the examples over them.

    python jobs/base_eval.py --preset cpu      # or jobs/chat_eval.py

    evaluator = Evaluator("sft", cfg, tokenizer_dir, data_root, root=None)
    correct, total = evaluator.core(task, [0, 1, 2])
"""

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanochat_ray.checkpoint import build_model_from_checkpoint, checkpoint_dir, latest_step
from nanochat_ray.common import add_verbose_flag, autocast, base_dir, compute_dtype, default_device, write_atomic
from nanochat_ray.config import Config, ConfigError, add_config_args
from nanochat_ray.data.rows import to_batch, val_rows
from nanochat_ray.evals import core
from nanochat_ray.evals.bpb import evaluate_bpb
from nanochat_ray.evals.chatcore import EvalResult, run_task_eval
from nanochat_ray.gpt import build_gpt
from nanochat_ray.stage import greedy_samples
from nanochat_ray.tokenizer import Tokenizer


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
        rows = val_rows(shard, self.tokenizer, self.cfg, rank=0, world_size=1)
        batches = [to_batch(rows[i:i + self.cfg.device_batch_size], self.device)
                   for i in range(0, len(rows), self.cfg.device_batch_size)]
        return evaluate_bpb(self.model, batches, self.tokenizer.token_bytes(), self.autocast)

    def samples(self, prompts: list[str], max_tokens: int = 16) -> dict[str, str]:
        """Greedy continuations of the fixed prompts."""
        ids = [self.tokenizer.encode(prompt, prepend="<|bos|>") for prompt in prompts]
        return dict(zip(prompts, greedy_samples(self.model, self.tokenizer, ids, max_tokens)))

    def core(self, task: core.TaskSpec, indices: list[int]) -> tuple[int, int]:
        with torch.inference_mode(), self.autocast:
            return core.evaluate_task(self.model, self.tokenizer, task, indices)

    def chat(self, task_name: str, indices: list[int], **options) -> EvalResult:
        from nanochat_ray.evals.sandbox import run_program
        with torch.inference_mode():
            return run_task_eval(task_name, self.model, self.tokenizer, indices, data_root=self.data_root,
                                 run_program=lambda code: run_program(code).success,
                                 autocast_ctx=self.autocast, **options)


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


def numeric_leaves(results: dict, prefix: str = "") -> list[tuple[str, float]]:
    """("tasks/GSM8K", 0.04), ... for every number in a nested dict of results (not the texts)."""
    leaves = []
    for key, value in results.items():
        if isinstance(value, dict):
            leaves += numeric_leaves(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            leaves.append((f"{prefix}{key}", float(value)))
    return leaves
