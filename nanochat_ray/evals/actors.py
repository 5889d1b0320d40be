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

Run by: python jobs/base_eval.py and python jobs/chat_eval.py.
"""

import json
from pathlib import Path

import ray

from nanochat_ray.common import write_atomic
from nanochat_ray.config import Config
from nanochat_ray.evals import core
from nanochat_ray.evals.chatcore import EvalResult, chatcore, load_eval_task
from nanochat_ray.evals.evaluator import Evaluator, Progress, check_checkpoint, evals_dir, numeric_leaves


# an actor whose process dies (OOM kill, lost node, segfault) comes back with the model reloaded,
# and the calls it had not finished run again; every call is a pure function of its arguments
MAX_RESTARTS = 3
EvalActor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(Evaluator)


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
