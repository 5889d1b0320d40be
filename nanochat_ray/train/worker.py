"""
The Ray Train side of every training stage (base, mid, sft): one worker function, one driver.

A stage is a TrainSpec: its config, where its checkpoints go, what it starts from, and a data
source. `fit(spec, ...)` runs a TorchTrainer whose workers each:
  - build the model and the distributed optimizers (gradients sync in optim.py, no DDP wrapper),
  - start from Ray's checkpoint after a worker failure, else the stage's latest with --resume,
    else the previous stage's weights (mid, sft), else a fresh init (base),
  - open the data source at the saved data position and run train/loop.py,
  - report metrics every step and a checkpoint every cfg.save_every steps.
Checkpoints land in <base_dir>/checkpoints/<stage>/<model_tag>/step_NNNNNN (the Ray run's storage
path), in the format of checkpoint.py, so every later stage loads them without Ray.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from nanochat_ray.checkpoint import (checkpoint_dir, describe_file, finalize_checkpoint, latest_step, load_checkpoint,
                                     mark_latest, read_checkpoint, step_name, write_checkpoint)
from nanochat_ray.common import compute_dtype, init_ray, maybe_compile, peak_flops, print0
from nanochat_ray.config import Config, ConfigError, validate
from nanochat_ray.gpt import GPT, build_gpt
from nanochat_ray.optim import build_optimizers
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.stage import greedy_samples
from nanochat_ray.train.loop import Batches, Periodic, TrainState, run

METRICS_LOG = "metrics.jsonl"  # one line per step, appended by rank 0 (a resumed step appears again)
DASHBOARD_METRICS = ("loss_ema", "tokens_per_second", "mfu", "data_wait_fraction", "step", "val_bpb",
                     "core", "mmlu_acc", "arc_easy_acc")  # the evaluations during training, when a stage runs them


class DataSource(Protocol):
    """Where a stage's rows come from. Built on the driver, pickled to every worker."""
    tokenizer_dir: str

    def iterations(self, cfg: Config, model: GPT) -> int:
        """Optimizer steps of the stage."""

    def open(self, cfg: Config, rank: int, world_size: int, state: TrainState, device: torch.device) -> Batches:
        """Start serving this worker's rows from state.step / state.data_position."""

    def evaluations(self, cfg: Config, model: GPT, tokenizer: Tokenizer, rank: int, world_size: int,
                    device: torch.device) -> Periodic:
        """The periodic evaluations (val bpb every cfg.eval_every steps, ...) on this worker's share."""

    def sample_prompts(self, tokenizer: Tokenizer) -> list[list[int]]:
        """Token ids of the fixed prompts whose greedy continuations are printed."""


@dataclass
class TrainSpec:
    stage: str  # base | mid | sft
    cfg: Config
    stage_dir: Path
    data: DataSource
    resume: bool = False
    init_from: Path | None = None  # a previous stage's checkpoint directory (weights only)
    fail_at_step: int | None = None  # test-only: the last rank exits hard after this step


class NullLogger:
    """Stands in for wandb when no run name is given, so the loop has no `if wandb` branches."""

    def log(self, metrics: dict, step: int) -> None:
        pass


def make_logger(cfg: Config, stage: str, rank: int):
    if cfg.run == "dummy" or rank != 0:
        return NullLogger()
    import wandb  # imported only when used: it is slow to import

    return wandb.init(project="nanochat-ray", name=f"{cfg.run}-{stage}", config=cfg.to_dict())


def dashboard_gauges(stage: str) -> dict:
    """Custom metrics for the Ray dashboard (Prometheus names: letters, digits, underscores)."""
    from ray.util.metrics import Gauge

    return {name: Gauge(f"nanochat_{stage}_{name}", description=f"{stage} training {name}", tag_keys=("model",))
            for name in DASHBOARD_METRICS}


# -----------------------------------------------------------------------------
# the per-worker function


def train_worker(spec: TrainSpec) -> None:
    cfg = spec.cfg
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = compute_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)

    model = build_gpt(cfg.gpt_config(), device)
    optimizers = build_optimizers(model, cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
    for opt in optimizers:  # e.g. SFT starts at 2% of the base LRs
        for group in opt.param_groups:
            group["initial_lr"] *= cfg.init_lr_frac
    state, resumed_from = TrainState(), None
    ray_checkpoint = ray.train.get_checkpoint()  # set after a worker failure (FailureConfig)
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            model_state, optim_state, meta = read_checkpoint(directory, device, rank)
        resumed_from = ray_checkpoint.path
    elif spec.resume and latest_step(spec.stage_dir) is not None:
        model_state, optim_state, meta = load_checkpoint(spec.stage_dir, device=device, rank=rank)
        resumed_from = spec.stage_dir / step_name(meta["step"])
    if resumed_from is not None:
        model.load_state_dict(model_state)
        for opt, opt_state in zip(optimizers, optim_state):
            opt.load_state_dict(opt_state)
        state = TrainState(**meta["train_state"])
        print0(f"resumed from {resumed_from} at step {state.step}")
    elif spec.init_from is not None:
        model_state, _, meta = read_checkpoint(spec.init_from, device, load_optimizer=False)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in model_state.items()})
        print0(f"starting from {spec.init_from}")

    tokenizer = Tokenizer.from_directory(spec.data.tokenizer_dir)
    num_iterations = spec.data.iterations(cfg, model)
    batches = spec.data.open(cfg, rank, world_size, state, device)
    evaluations = spec.data.evaluations(cfg, model, tokenizer, rank, world_size, device)
    prompts = spec.data.sample_prompts(tokenizer)

    def sample() -> dict:
        if rank == 0:
            for ids, text in zip(prompts, greedy_samples(model, tokenizer, prompts)):
                print0(f"  {tokenizer.decode(ids)!r} -> {text!r}")
        return {}

    logger, gauges = make_logger(cfg, spec.stage, rank), dashboard_gauges(spec.stage) if rank == 0 else {}

    def report(metrics: dict, state: TrainState, save: bool) -> None:
        logger.log(metrics, step=state.step)
        if rank == 0:  # the run's history, for the report card and for comparing runs
            with open(spec.stage_dir / METRICS_LOG, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        for name, gauge in gauges.items():
            if name in metrics:
                gauge.set(metrics[name], tags={"model": cfg.model_tag})
        if not save:
            ray.train.report(metrics)
        else:
            meta = {"step": state.step, "stage": spec.stage, "model_config": dataclasses.asdict(cfg.gpt_config()),
                    "config": cfg.to_dict(), "train_state": dataclasses.asdict(state), "metrics": metrics}
            save_and_report(metrics, meta, model, optimizers, rank, world_size)
            if rank == 0:
                mark_latest(spec.stage_dir, state.step)
        if spec.fail_at_step == state.step and resumed_from is None and rank == world_size - 1:
            # test-only: a worker dies mid-run; FailureConfig must bring the run back
            print(f"rank {rank}: injected failure after step {state.step}", flush=True)
            os._exit(1)

    # SFT pads each step's rows to its longest conversation, so the length changes every step. Static
    # shapes recompiled at every new length until Dynamo's limit of 8 and then ran eagerly; padding
    # to power-of-two buckets took 3 graphs over 12 steps but 30% more tokens; dynamic=True took one
    # graph and no extra tokens (CPU, Dynamo's counters; README, Benchmarks). Pretraining and
    # midtraining rows are packed to seq_len: static.
    step_model = maybe_compile(model, cfg.compile, device, dynamic=spec.stage == "sft")
    run(cfg, model, optimizers, batches, report, state, num_iterations, peak_flops(device, dtype),
        step_model=step_model, periodic=[*evaluations, (cfg.sample_every, sample)])


def save_and_report(metrics: dict, meta: dict, model: GPT, optimizers: list, rank: int, world_size: int) -> None:
    """Each rank writes its files to a local temp dir; Ray merges them into one step dir in storage.

    meta.json (written by rank 0, last) lists every rank's files with their hashes, gathered
    here, so a step whose upload was cut short never verifies and is never resumed from.
    """
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, model.state_dict() if rank == 0 else None,
                         [opt.state_dict() for opt in optimizers], rank)
        own = {p.name: describe_file(p) for p in Path(directory).iterdir()}
        every = [own]
        if world_size > 1:
            every = [None] * world_size
            dist.all_gather_object(every, own)
        if rank == 0:
            others = {name: d for files in every[1:] for name, d in files.items()}
            finalize_checkpoint(directory, meta, world_size, other_files=others)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory),
                         checkpoint_dir_name=step_name(meta["step"]))


# -----------------------------------------------------------------------------
# the driver


def check_stage(cfg: Config, stage: str, tokenizer_dir: Path, num_workers: int = 1, resume: bool = False,
                fresh: bool = False, artifact_root: Path | None = None) -> Path:
    """Everything that can be wrong before any work: config, tokenizer, an existing run.

    Returns the stage directory, ready to write into (--fresh moves an old run aside).
    """
    validate(cfg, world_size=num_workers)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but vocab_size is "
                          f"{cfg.vocab_size}: pass --vocab-size {tokenizer.vocab_size}, or retrain the tokenizer")
    stage_dir = checkpoint_dir(stage, cfg.model_tag, artifact_root)
    if latest_step(stage_dir) is not None and not resume:
        if not fresh:
            raise ConfigError(f"{stage_dir} already holds a {cfg.model_tag} {stage} run: pass --resume to "
                              f"continue it, or --fresh to move it aside and start over")
        aside = stage_dir.with_name(f"{stage_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(stage_dir, aside)
        print(f"moved the previous run aside to {aside}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage_dir


def fit(spec: TrainSpec, *, num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1.0,
        max_failures: int = 2, callbacks: list | None = None) -> dict:
    """Run one training stage on Ray Train; returns the final metrics and checkpoint path.

    `callbacks` go to the RunConfig (e.g. Tune's TuneReportCallback when a sweep runs the stage).
    """
    init_ray()
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_worker, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=spec.stage_dir.name, storage_path=str(spec.stage_dir.parent),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3), callbacks=callbacks),
    )
    result = trainer.fit()
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
