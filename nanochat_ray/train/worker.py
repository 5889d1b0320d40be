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

Run by: python jobs/pretrain.py, jobs/midtrain.py, jobs/sft.py.
"""

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from nanochat_ray.checkpoint import (describe_file, finalize_checkpoint, latest_step, load_checkpoint,
                                     mark_latest, read_checkpoint, step_name, write_checkpoint)
from nanochat_ray.common import compute_dtype, dashboard_gauges, maybe_compile, peak_flops, print0
from nanochat_ray.config import Config
from nanochat_ray.gpt import GPT, build_gpt
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.stage import (TRAINING_GAUGES, MetricRecorder, RunOptions, checkpoint_meta, greedy_samples,
                                stage_optimizers, without_compile_prefix)
from nanochat_ray.train.loop import Batches, Periodic, TrainState, run

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
    optimizers = stage_optimizers(model, cfg)  # e.g. SFT starts at 2% of the base LRs
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
        model.load_state_dict(without_compile_prefix(model_state))
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

    recorder = (MetricRecorder(cfg, spec.stage, spec.stage_dir, dashboard_gauges(spec.stage, TRAINING_GAUGES))
                if rank == 0 else None)

    def report(metrics: dict, state: TrainState, save: bool) -> None:
        if recorder is not None:
            recorder.record(metrics)
        if not save:
            ray.train.report(metrics)
        else:
            meta = checkpoint_meta(spec.stage, cfg, state.step, dataclasses.asdict(state), metrics)
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


def fit(spec: TrainSpec, run: RunOptions, callbacks: list | None = None) -> dict:
    """Run one training stage on Ray Train (the stage's driver has started Ray); returns the final
    metrics and checkpoint path.

    `callbacks` go to the RunConfig (e.g. Tune's TuneReportCallback when a sweep runs the stage).
    """
    resources = {"CPU": run.cpus_per_worker} | ({"GPU": 1} if run.use_gpu else {})
    trainer = TorchTrainer(
        train_worker, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=spec.stage_dir.name, storage_path=str(spec.stage_dir.parent),
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3), callbacks=callbacks),
    )
    result = trainer.fit()
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
