"""
What every training stage shares, Ray-free: how it runs (RunOptions, built once from the flags),
the checks before it starts and where it starts from, its optimizers and their schedule, its
checkpoint's meta, its metric records, and the fixed prompts whose greedy continuations show how
a model is doing. The TorchTrainer stages
(train/worker.py) and RL's learner and driver (rl/) are built from these pieces.

    python jobs/pretrain.py | jobs/midtrain.py | jobs/sft.py | jobs/rl.py

    optimizers = stage_optimizers(model, cfg)                  # LRs scaled by cfg.init_lr_frac
    multiplier = apply_schedule(optimizers, cfg, step, num_iterations)
"""

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat_ray.checkpoint import PREVIOUS, TRAIN_JOBS, checkpoint_dir, latest_step, load_checkpoint, step_name
from nanochat_ray.config import Config, ConfigError, validate
from nanochat_ray.engine import Engine
from nanochat_ray.gpt import GPT
from nanochat_ray.optim import build_optimizers, set_muon_momentum
from nanochat_ray.tokenizer import Tokenizer

METRICS_LOG = "metrics.jsonl"  # one line per step, appended by rank 0; a restart cuts it back to its checkpoint
# the metrics each stage shows on the Ray dashboard (the evaluations during training, when a stage runs them)
TRAINING_GAUGES = ("loss_ema", "tokens_per_second", "mfu", "data_wait_fraction", "step", "val_bpb",
                   "core", "mmlu_acc", "arc_easy_acc")
RL_GAUGES = ("mean_reward", "rollout_tokens_per_second", "learner_seconds", "rollout_idle_fraction",
             "mean_sequence_length", "pass_at_1", "step")


# -----------------------------------------------------------------------------
# before a stage starts


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs, as opposed to what it trains (Config): built once from the command line
    (train/cli.run_options) and handed to the stage's driver, its checks and Ray Train."""
    tokenizer_dir: Path
    data_root: str | None = None  # a local mirror laid out like shared/data
    num_workers: int = 1  # training workers (RL: its one learner)
    use_gpu: bool = False  # one GPU per worker
    # None (the Ray Train stages' CLI default): the CPUs free when the stage starts, shared over its
    # workers (train/worker.py); a worker's torch runs as many threads as it reserves CPUs
    cpus_per_worker: float | None = 1.0
    resume: bool = False  # continue the stage's latest checkpoint
    fresh: bool = False  # move an existing run of the stage aside and start over
    max_failures: int = 2  # restarts of the workers (or RL's actors) before giving up
    artifact_root: Path | None = None  # default: base_dir()
    fail_at_step: int | None = None  # tests: a worker fails after this step, once
    data_actors: int = 1  # Ray Data actors that tokenize (pretraining) or render (mid, sft) the rows
    # CPUs each data actor reserves: 0 on CPU-only runs, where the actors share the workers' cores instead
    # of starving them (the jobs' --data-actor-cpus defaults to 1 with GPUs)
    data_actor_cpus: float = 0.0
    placement_strategy: str = "PACK"  # how the workers are placed over nodes (one of PLACEMENT_STRATEGIES)


def check_stage(cfg: Config, stage: str, run: RunOptions) -> Path:
    """Everything that can be wrong before any work: config, tokenizer, an existing run.

    Returns the stage directory, ready to write into (--fresh moves an old run aside).
    """
    validate(cfg, world_size=run.num_workers)
    tokenizer = Tokenizer.from_directory(run.tokenizer_dir)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(f"the tokenizer in {run.tokenizer_dir} has {tokenizer.vocab_size} tokens but vocab_size is "
                          f"{cfg.vocab_size}: pass --vocab-size {tokenizer.vocab_size}, or retrain the tokenizer")
    stage_dir = checkpoint_dir(stage, cfg.model_tag, run.artifact_root)
    if latest_step(stage_dir) is not None and not run.resume:
        if not run.fresh:
            raise ConfigError(f"{stage_dir} already holds a {cfg.model_tag} {stage} run: pass --resume to "
                              f"continue it, or --fresh to move it aside and start over")
        aside = stage_dir.with_name(f"{stage_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(stage_dir, aside)
        print(f"moved the previous run aside to {aside}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage_dir


def previous_checkpoint(stage: str, cfg: Config, artifact_root: Path | None = None) -> Path:
    """The latest checkpoint of the stage `stage` starts from (PREVIOUS); an error naming the job
    to run if there is none, or if its model differs from cfg's."""
    previous = PREVIOUS[stage]
    previous_dir = checkpoint_dir(previous, cfg.model_tag, artifact_root)
    previous_step = latest_step(previous_dir)
    if previous_step is None:
        raise ConfigError(f"no {previous} checkpoint of {cfg.model_tag} in {previous_dir}: run "
                          f"jobs/{TRAIN_JOBS[previous]}.py first (or pass the same --preset/--depth as that run)")
    _, _, meta = load_checkpoint(previous_dir, previous_step, load_optimizer=False)
    if meta["model_config"] != dataclasses.asdict(cfg.gpt_config()):
        raise ConfigError(f"the {previous} checkpoint's model {meta['model_config']} differs from this "
                          f"config's {dataclasses.asdict(cfg.gpt_config())}: pass the same --preset and overrides "
                          f"as that run")
    return previous_dir / step_name(previous_step)


# -----------------------------------------------------------------------------
# optimizers, schedule, checkpoint meta


def stage_optimizers(model: GPT, cfg: Config) -> list[torch.optim.Optimizer]:
    """AdamW and Muon at the config's LRs, scaled by cfg.init_lr_frac (SFT 2%, RL 5% of the base LRs)."""
    optimizers = build_optimizers(model, cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= cfg.init_lr_frac
    return optimizers


def apply_schedule(optimizers: list[torch.optim.Optimizer], cfg: Config, step: int, num_iterations: int) -> float:
    """Set the LRs and Muon's momentum for `step`; returns the LR multiplier.

    The momentum policy is each stage's explicit choice, in its config: cfg.muon_momentum_warmup
    steps of warmup (the reference's pretraining), or 0 for a constant momentum (its RL).
    """
    multiplier = cfg.lr_multiplier(step, num_iterations)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
    set_muon_momentum(optimizers[1], step, cfg.muon_momentum_warmup)
    return multiplier


def without_compile_prefix(state: dict) -> dict:
    """A state dict saved from a torch.compile'd module, with the wrapper's `_orig_mod.` prefix removed."""
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def checkpoint_meta(stage: str, cfg: Config, step: int, train_state: dict, metrics: dict) -> dict:
    """meta.json of a stage's checkpoint: what later stages check and a resume restores."""
    return {"step": step, "stage": stage, "model_config": dataclasses.asdict(cfg.gpt_config()),
            "config": cfg.to_dict(), "train_state": train_state, "metrics": metrics}


# -----------------------------------------------------------------------------
# metric records


class NullLogger:
    """Stands in for wandb when no run name is given, so the loop has no `if wandb` branches."""

    def log(self, metrics: dict, step: int) -> None:
        pass


def make_logger(cfg: Config, stage: str, rank: int):
    if cfg.run == "dummy" or rank != 0:
        return NullLogger()
    import wandb  # imported only when used: it is slow to import

    return wandb.init(project="nanochat-ray", name=f"{cfg.run}-{stage}", config=cfg.to_dict())


class MetricRecorder:
    """Where a stage's metrics go each step: wandb (or nothing), the stage's metrics.jsonl (the
    run's history, for the report card and for comparing runs) and the dashboard's gauges."""

    def __init__(self, cfg: Config, stage: str, stage_dir: Path, gauges: dict):
        self.cfg, self.path, self.gauges = cfg, Path(stage_dir) / METRICS_LOG, gauges
        self.logger = make_logger(cfg, stage, 0)

    def record(self, metrics: dict) -> None:
        self.logger.log(metrics, step=metrics["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, gauge in self.gauges.items():
            if name in metrics:
                gauge.set(metrics[name], tags={"model": self.cfg.model_tag})


# -----------------------------------------------------------------------------
# samples


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]
SAMPLE_QUESTIONS = ["What is the capital of France?", "Who are you?", "How many r are in strawberry?"]


def greedy_samples(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], max_tokens: int = 16) -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded; it stops early at the end of an answer."""
    engine = Engine(model, tokenizer)
    return [tokenizer.decode(engine.generate_batch(ids, max_tokens=max_tokens, temperature=0.0)[0][0][len(ids):])
            for ids in prompts]
