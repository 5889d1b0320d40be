"""
Base-model pretraining on Ray Train: a TorchTrainer around the plain loop of train/loop.py.

    python jobs/pretrain.py --preset cpu --num-workers 2

The driver starts a BatchFeeder (data/pipeline.py: Ray Data tokenizes the shards on an
actor pool while the workers train) and a TorchTrainer whose workers each:
  - build the model and the distributed optimizers (gradients sync in optim.py, no DDP wrapper),
  - resume from Ray's checkpoint after a failure, or from the stage's latest with --resume,
  - ask the feeder for their rows of each step one step ahead,
  - report metrics every step and a checkpoint every cfg.save_every steps.
Checkpoints land in <base_dir>/checkpoints/base/<model_tag>/step_NNNNNN (the Ray run's storage),
in the format of checkpoint.py, so every later stage loads them without Ray.
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from nanochat_ray.checkpoint import (checkpoint_dir, describe_file, finalize_checkpoint, latest_step, load_checkpoint,
                                     mark_latest, read_checkpoint, step_name, write_checkpoint)
from nanochat_ray.common import autocast, compute_dtype, init_ray, maybe_compile, peak_flops, print0
from nanochat_ray.config import Config, ConfigError, validate
from nanochat_ray.data.pipeline import BatchFeeder, row_groups
from nanochat_ray.evals.bpb import evaluate_bpb
from nanochat_ray.gpt import GPT, build_gpt
from nanochat_ray.optim import build_optimizers
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.train.loop import SAMPLE_PROMPTS, TrainState, run, sample_greedy, to_batch

STAGE = "base"
METRICS_LOG = "metrics.jsonl"  # one line per step, appended by rank 0 (a resumed step appears again)
METRICS = ("loss_ema", "tokens_per_second", "mfu", "data_wait_fraction", "step", "val_bpb")


def val_rows(val_shard: str, tokenizer: Tokenizer, cfg: Config, rank: int, world_size: int) -> np.ndarray:
    """This worker's share of the first cfg.eval_tokens tokens of the validation shard, packed."""
    row_len = cfg.seq_len + 1
    wanted = cfg.eval_tokens // cfg.seq_len  # rows over all workers
    stream: list[int] = []
    shard = pq.ParquetFile(val_shard)
    for group in range(shard.num_row_groups):
        texts = shard.read_row_group(group, columns=["text"]).column("text").to_pylist()
        for ids in tokenizer.encode(texts, prepend="<|bos|>"):
            stream += ids
        if len(stream) >= wanted * row_len:
            break
    available = len(stream) // row_len
    if available < world_size:
        raise ValueError(f"validation shard {val_shard} holds {available} rows of {row_len} tokens, "
                         f"fewer than the {world_size} workers; use a bigger val shard or a shorter seq_len")
    rows = np.array(stream[:min(wanted, available) * row_len], dtype=np.int32).reshape(-1, row_len)
    return rows[rank::world_size][: len(rows) // world_size]  # equal shares: every rank runs the same batches


class NullLogger:
    """Stands in for wandb when no run name is given, so the loop has no `if wandb` branches."""

    def log(self, metrics: dict, step: int) -> None:
        pass


def make_logger(cfg: Config, rank: int):
    if cfg.run == "dummy" or rank != 0:
        return NullLogger()
    import wandb  # imported only when used: it is slow to import

    return wandb.init(project="nanochat-ray", name=cfg.run, config=cfg.to_dict())


def dashboard_gauges() -> dict:
    """Custom metrics for the Ray dashboard (Prometheus names: letters, digits, underscores)."""
    from ray.util.metrics import Gauge

    return {name: Gauge(f"nanochat_pretrain_{name}", description=f"pretraining {name}", tag_keys=("model",))
            for name in METRICS}


# -----------------------------------------------------------------------------
# the per-worker function


def train_worker(loop_config: dict) -> None:
    # Ray Train logs every report at INFO (with all metrics): our own step line says it shorter
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = Config(**loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = compute_dtype(cfg.dtype, device)
    stage_dir = Path(loop_config["stage_dir"])
    torch.manual_seed(cfg.seed)

    model = build_gpt(cfg.gpt_config(), device)
    optimizers = build_optimizers(model, cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
    state, resumed_from = TrainState(), None
    ray_checkpoint = ray.train.get_checkpoint()  # set after a worker failure (FailureConfig)
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            model_state, optim_state, meta = read_checkpoint(directory, device, rank)
        resumed_from = ray_checkpoint.path
    elif loop_config["resume"] and latest_step(stage_dir) is not None:
        model_state, optim_state, meta = load_checkpoint(stage_dir, device=device, rank=rank)
        resumed_from = stage_dir / step_name(meta["step"])
    if resumed_from is not None:
        model.load_state_dict(model_state)
        for opt, opt_state in zip(optimizers, optim_state):
            opt.load_state_dict(opt_state)
        state = TrainState(**meta["train_state"])
        print0(f"resumed from {resumed_from} at step {state.step}")

    num_iterations = cfg.iterations(model.num_params(), model.estimate_flops())
    step_model = maybe_compile(model, cfg.compile, device)
    tokenizer = Tokenizer.from_directory(loop_config["tokenizer_dir"])
    val = val_rows(loop_config["val_shard"], tokenizer, cfg, rank, world_size)
    val_batches = [to_batch(val[i:i + cfg.device_batch_size], device) for i in range(0, len(val), cfg.device_batch_size)]
    token_bytes = tokenizer.token_bytes().to(device)

    feeder = loop_config["feeder"]
    if rank == 0:
        ray.get(feeder.reset.remote(state.data_position, state.step, world_size,
                                    cfg.grad_accum_steps(world_size) * cfg.device_batch_size))
    if world_size > 1:
        dist.barrier()  # nobody asks for rows before the feeder is at the right position

    def batches(step: int):
        ref = feeder.get.remote(step, rank)
        return lambda: ray.get(ref)

    def evaluate() -> dict:
        return {"val_bpb": evaluate_bpb(model, val_batches, token_bytes, autocast(device, dtype))}

    def sample() -> dict:
        if rank == 0:
            for prompt in SAMPLE_PROMPTS:
                ids = sample_greedy(model, tokenizer.encode(prompt, prepend="<|bos|>"), max_tokens=16)
                print0(f"  {prompt!r} -> {tokenizer.decode(ids)!r}")
        return {}

    logger, gauges = make_logger(cfg, rank), dashboard_gauges() if rank == 0 else {}
    fail_at_step = loop_config.get("fail_at_step")

    def report(metrics: dict, state: TrainState, save: bool) -> None:
        logger.log(metrics, step=state.step)
        if rank == 0:  # the run's history, for the report card and for comparing runs
            with open(stage_dir / METRICS_LOG, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        for name, gauge in gauges.items():
            if name in metrics:
                gauge.set(metrics[name], tags={"model": cfg.model_tag})
        if not save:
            ray.train.report(metrics)
        else:
            meta = {"step": state.step, "stage": STAGE, "model_config": dataclasses.asdict(cfg.gpt_config()),
                    "config": cfg.to_dict(), "train_state": dataclasses.asdict(state), "metrics": metrics}
            save_and_report(metrics, meta, model, optimizers, rank, world_size)
            if rank == 0:
                mark_latest(stage_dir, state.step)
        if fail_at_step == state.step and resumed_from is None and rank == world_size - 1:
            # test-only: a worker dies mid-run; FailureConfig must bring the run back
            print(f"rank {rank}: injected failure after step {state.step}", flush=True)
            os._exit(1)

    run(cfg, model, optimizers, batches, report, state, num_iterations,
        peak_flops(device, dtype), step_model=step_model, evaluate=evaluate, sample=sample)


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


def check_run(cfg: Config, tokenizer_dir: Path, num_workers: int = 1, resume: bool = False,
              fresh: bool = False, artifact_root: Path | None = None) -> Path:
    """Everything that can be wrong before any work: config, tokenizer, an existing run.

    Returns the stage directory, ready to write into (--fresh moves an old run aside).
    """
    validate(cfg, world_size=num_workers)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but vocab_size is "
                          f"{cfg.vocab_size}: pass --vocab-size {tokenizer.vocab_size}, or retrain the tokenizer")
    stage_dir = checkpoint_dir(STAGE, cfg.model_tag, artifact_root)
    if latest_step(stage_dir) is not None and not resume:
        if not fresh:
            raise ConfigError(f"{stage_dir} already holds a {cfg.model_tag} run: pass --resume to continue it, "
                              f"or --fresh to move it aside and start over")
        aside = stage_dir.with_name(f"{stage_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(stage_dir, aside)
        print(f"moved the previous run aside to {aside}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage_dir


def pretrain(cfg: Config, *, num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1.0,
             train_shards: list[Path], val_shard: Path, tokenizer_dir: Path, resume: bool = False,
             fresh: bool = False, max_failures: int = 2, data_actors: int = 1, data_actor_cpus: float = 0.5,
             artifact_root: Path | None = None, fail_at_step: int | None = None) -> dict:
    """Run base pretraining with Ray Train; returns the final metrics and checkpoint path.

    Every input is checked before Ray starts (a local Ray is started when none is running).
    """
    stage_dir = check_run(cfg, tokenizer_dir, num_workers, resume, fresh, artifact_root)
    row_groups(train_shards + [val_shard])  # a missing or corrupt shard fails here, by name
    init_ray()
    feeder = BatchFeeder.remote([str(p) for p in train_shards], str(tokenizer_dir), cfg.seq_len,
                                data_actors, data_actor_cpus)
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "feeder": feeder, "stage_dir": str(stage_dir),
                           "tokenizer_dir": str(tokenizer_dir), "val_shard": str(val_shard),
                           "resume": resume, "fail_at_step": fail_at_step},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=stage_dir.name, storage_path=str(stage_dir.parent),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3)),
    )
    result = trainer.fit()
    ray.kill(feeder)
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
