"""
The Ray Train side of every training stage (base, mid, sft): one worker function, one driver.

A stage is a TrainSpec: its config, where its checkpoints go, what it starts from, and a data
source. `fit(spec, ...)` runs a TorchTrainer whose workers each:
  - build the model and the distributed optimizers (gradients sync in optim.py, no DDP wrapper),
  - start from Ray's checkpoint after a worker failure, else the stage's latest (--resume, or a restart
    whose last checkpoint Ray had not registered yet),
    else the previous stage's weights (mid, sft), else a fresh init (base),
  - open the data source at the saved data position and run train/loop.py,
  - report metrics every step and a checkpoint every cfg.save_every steps.
Checkpoints land in <base_dir>/checkpoints/<stage>/<model_tag>/step_NNNNNN (the Ray run's storage
path), in the format of checkpoint.py, so every later stage loads them without Ray.

On a cluster the artifact root must be storage every node sees: fit() writes a marker file there
and every worker reads it before anything else, so a node without the shared mount fails the
run at start-up, naming the node, instead of at its first checkpoint. Workers are placed with
the placement strategy given to fit() (PACK by default; SPREAD or STRICT_SPREAD over nodes).

Run by: python jobs/pretrain.py, jobs/midtrain.py, jobs/sft.py.
"""

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from nanochat_ray.checkpoint import (describe_file, finalize_checkpoint, latest_step, load_checkpoint,
                                     mark_latest, read_checkpoint, step_name, write_checkpoint)
from nanochat_ray.common import (TRAINING_ENV, compute_dtype, dashboard_gauges, maybe_compile, peak_flops, print0,
                                 verbose, write_atomic)
from nanochat_ray.config import Config, ConfigError
from nanochat_ray.gpt import GPT, build_gpt
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.stage import (METRICS_LOG, PLACEMENT_STRATEGIES, TRAINING_GAUGES, MetricRecorder, RunOptions,
                                checkpoint_meta, greedy_samples, stage_optimizers, without_compile_prefix)
from nanochat_ray.train import startup
from nanochat_ray.train.loop import Batches, Periodic, TrainState, run
from nanochat_ray.train.process_group import ProcessGroupConfig

STORAGE_MARKERS = ".shared-storage"  # under the artifact root: one marker file per running fit()
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch, read by its controller


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

    def first_rows_time(self) -> float | None:
        """time.time() at which the first step's rows were ready (the start-up breakdown), if known."""


@dataclass
class TrainSpec:
    stage: str  # base | mid | sft
    cfg: Config
    stage_dir: Path
    data: DataSource
    resume: bool = False
    init_from: Path | None = None  # a previous stage's checkpoint directory (weights only)
    fail_at_step: int | None = None  # test-only: the last rank exits hard after this step
    storage_marker: str | None = None  # set by fit(): the marker file every worker must see
    startup: dict | None = None  # set by fit(): the driver's start-up marks (train/startup.py)


# -----------------------------------------------------------------------------
# the per-worker function


def check_shared_storage(marker: str, node: str) -> None:
    """The worker's side of the shared-storage check: the driver's marker must be visible here."""
    if not Path(marker).is_file():
        root = Path(marker).parent.parent
        raise RuntimeError(
            f"the artifact root {root} on node {node} is not the storage the driver writes to (its marker "
            f"{Path(marker).name} is missing here): checkpoints and artifacts must live on storage every node "
            "mounts at the same path. Mount the shared file system on every node and point NANOCHAT_BASE_DIR "
            "into it (cluster.yaml mounts EFS at /mnt/efs; README, Cluster).")


def background_peak_flops(device: torch.device, dtype: torch.dtype):
    """The MFU denominator, measured on a thread started after step 1, so that the probe (a second of
    matmuls on CPU) is not on the way to the first step: on a machine with few cores it would take
    one from the model build and step 1. Returns a function giving it: None at step 1 (the call that
    starts the probe); from step 2 on it waits for the probe (it overlapped step 2)."""
    found: list[float] = []
    thread = threading.Thread(target=lambda: found.append(peak_flops(device, dtype)), daemon=True)
    calls = 0

    def peak() -> float | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            thread.start()
            return None
        thread.join()
        return found[0] if found else None
    return peak


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step`: a restart from a checkpoint runs the later ones again,
    and the log then holds each step once, as the run that continues computed it."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in lines))


def train_worker(config: dict) -> None:
    # (by reference: see fit()) the driver's object, here at once or an error if the driver is gone
    spec: TrainSpec = ray.get(config["spec"], timeout=60)
    if not verbose():
        # Ray Train logs every report ("Reporting training result N: ...") through a logger named
        # after its file, not under `ray.train`, so LoggingConfig misses it; it reaches the root logger
        logging.getLogger().setLevel(logging.WARNING)
    cfg = spec.cfg
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    marks = dict(spec.startup or {}) | {"worker": time.time()}
    if (started := startup.process_start_time()) is not None:
        marks["worker process"] = started
    if spec.storage_marker is not None:
        check_shared_storage(spec.storage_marker, ray.get_runtime_context().get_node_id())
    device = ray.train.torch.get_device()
    dtype = compute_dtype(cfg.dtype, device)
    peak = background_peak_flops(device, dtype)
    torch.manual_seed(cfg.seed)

    model = build_gpt(cfg.gpt_config(), device)
    optimizers = stage_optimizers(model, cfg)  # e.g. SFT starts at 2% of the base LRs
    state, resumed_from = TrainState(), None
    ray_checkpoint = ray.train.get_checkpoint()  # set after a worker failure (FailureConfig)
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            model_state, optim_state, meta = read_checkpoint(directory, device, rank)
        resumed_from = ray_checkpoint.path
    elif latest_step(spec.stage_dir) is not None:
        # --resume; or a restart after a failure that came before Ray registered the last checkpoint
        # (its report is collected asynchronously). check_stage left only this run's steps here.
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
    if rank == 0:
        truncate_metrics(spec.stage_dir / METRICS_LOG, state.step)
    first_step = state.step + 1

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
        if state.step == first_step and rank == 0:
            rows_at = spec.data.first_rows_time()
            print0(startup.format_breakdown(marks | {"step1": time.time()} | ({"rows": rows_at} if rows_at else {})))
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
    marks["loop"] = time.time()
    run(cfg, model, optimizers, batches, report, state, num_iterations, peak,
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


class StageTrainer(TorchTrainer):
    """A TorchTrainer without helper actors that a stage has no use for, each one more process
    (~1.6 CPU seconds of Ray Train and Ray Data imports) starting beside the worker on the way to
    step 1: the DatasetManager (it serves `ray.train.get_dataset_shard`, and Ray Train starts it even
    with no datasets; our rows come from the stage's own feeder), and, when the driver calls fit()
    (`placement_group_cleaner=False`), the detached PlacementGroupCleaner, which removes the workers'
    placement group if the controller dies while its owner lives on. The controller dies with the
    driver, the job with it, and Ray removes a job's placement groups when it ends. Inside an actor
    (a sweep's trial, which Tune stops by killing it) the cleaner stays."""

    def __init__(self, *args, placement_group_cleaner: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused = (DatasetsCallback,) + (() if placement_group_cleaner else (PlacementGroupCleanerCallback,))

    def _create_default_callbacks(self) -> list:
        return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, self.unused)]


def write_storage_marker(stage_dir: Path) -> Path:
    """A marker file under the artifact root (<root>/checkpoints/<stage>/<tag> is the stage dir),
    unique to this fit() so that concurrent runs (a sweep's trials) never remove each other's."""
    marker = stage_dir.parents[2] / STORAGE_MARKERS / f"{stage_dir.parent.name}-{stage_dir.name}-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, f"written by the driver on {os.uname().nodename}\n")
    return marker


def free_cpu_share(num_workers: int) -> float:
    """CPUs per worker of a CPU-only stage that was given none: those free in the cluster now, shared
    over the workers, at most one node's (a worker runs on one node), at least 1."""
    free = ray.available_resources().get("CPU", 0.0)
    largest_node = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"])
    return float(max(1, min(largest_node, free // num_workers)))


def fit(spec: TrainSpec, run: RunOptions, callbacks: list | None = None) -> dict:
    """Run one training stage on Ray Train (the stage's driver has started Ray); returns the final
    metrics and checkpoint path.

    `callbacks` go to the RunConfig (e.g. Tune's TuneReportCallback when a sweep runs the stage).
    `run.placement_strategy` places the workers' bundles over nodes (PACK: as few nodes as possible;
    SPREAD: over as many as possible; STRICT_*: or wait until that is possible).
    """
    if run.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"placement strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                          f"got {run.placement_strategy!r}")
    if not run.use_gpu:
        # Ray Train's preemption watcher is one more actor process (a second and a half of CPU for
        # its imports) that starts beside the model build; a CPU-only run has no core to spare for
        # it. A lost node is still a worker failure, restarted from the last checkpoint.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    marker = write_storage_marker(spec.stage_dir)
    spec = dataclasses.replace(spec, storage_marker=str(marker),
                               startup=startup.MARKS | {"fit": time.time()})
    cpus = run.cpus_per_worker or (1.0 if run.use_gpu else free_cpu_share(run.num_workers))
    resources = {"CPU": cpus} | ({"GPU": 1} if run.use_gpu else {})
    trainer = StageTrainer(
        # Ray Train's controller unpickles the loop config and the backend config: the spec goes by
        # reference (its classes live in modules that import torch and the model), and the process
        # group is set up by a backend that imports no torch either (train/process_group.py), so the
        # controller, one of the processes that start one after the other before step 1, imports neither
        train_worker, train_loop_config={"spec": ray.put(spec)}, torch_config=ProcessGroupConfig(),
        # fit() called by an actor (a sweep's trial), not by the job's driver: keep the cleaner
        placement_group_cleaner=ray.get_runtime_context().get_actor_id() is not None,
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker=resources,
                                     placement_strategy=run.placement_strategy),
        run_config=RunConfig(name=spec.stage_dir.name, storage_path=str(spec.stage_dir.parent),
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3), callbacks=callbacks,
                             worker_runtime_env={"env_vars": TRAINING_ENV},
                             # Train's own INFO lines (resource requests, worker-group start, a
                             # "Reporting training result" dump per step) only with --verbose
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    try:
        result = trainer.fit()
    finally:
        marker.unlink(missing_ok=True)
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
