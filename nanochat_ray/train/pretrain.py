"""
Base-model pretraining: the data source of the `base` stage, and its driver.

    python jobs/pretrain.py --preset cpu --num-workers 2 --total-batch-size 2048

The driver starts a BatchFeeder (data/pipeline.py: Ray Data tokenizes the shards on an actor
pool while the workers train) at the run's data position before it starts the workers, so the
first rows are read while they start (and before the driver imports Ray Train, so the feeder's
process starts meanwhile); then it runs the stage with train/worker.py. Each worker
asks the feeder for its rows one step ahead and measures val bits per byte on the last shard.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from nanochat_ray.checkpoint import META_FILE, latest_step, step_name
from nanochat_ray.common import autocast, compute_dtype, init_ray
from nanochat_ray.config import Config, ConfigError
from nanochat_ray.data.pipeline import BatchFeeder, feeder_batches, get_within, row_groups, rows_per_slice
from nanochat_ray.evals import core
from nanochat_ray.evals.bpb import evaluate_bpb
from nanochat_ray.gpt import GPT
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.data.rows import to_batch, val_rows
from nanochat_ray.stage import SAMPLE_PROMPTS, RunOptions, check_stage
from nanochat_ray.train import startup
from nanochat_ray.train.loop import Batches, Periodic, TrainState, sum_over_workers


@dataclass
class PretrainData:
    """Rows from the BatchFeeder; val bpb on the val shard."""
    feeder: "ray.actor.ActorHandle"
    tokenizer_dir: str
    val_shard: str
    core_bundle: str | None  # the CORE eval bundle, when cfg.core_every > 0

    def iterations(self, cfg: Config, model: GPT) -> int:
        return cfg.iterations(model.num_params(), model.estimate_flops())

    def open(self, cfg: Config, rank: int, world_size: int, state: TrainState, device: torch.device) -> Batches:
        return feeder_batches(self.feeder, cfg, rank, world_size, state)

    def first_rows_time(self) -> float | None:
        return get_within(self.feeder.first_rows_time.remote(), "its first rows' time")

    def evaluations(self, cfg: Config, model: GPT, tokenizer: Tokenizer, rank: int, world_size: int,
                    device: torch.device) -> Periodic:
        """Val bpb every cfg.eval_every steps; CORE (cfg.core_max_per_task examples of each task,
        shared over the workers) every cfg.core_every steps."""
        token_bytes = tokenizer.token_bytes().to(device)
        ctx = autocast(device, compute_dtype(cfg.dtype, device))
        val_batches: list = []

        def val_bpb() -> dict:
            if not val_batches:  # tokenized at the first evaluation, not on the way to step 1
                val = val_rows(self.val_shard, tokenizer, cfg, rank, world_size)
                val_batches.extend(to_batch(val[i:i + cfg.device_batch_size], device)
                                   for i in range(0, len(val), cfg.device_batch_size))
            return {"val_bpb": evaluate_bpb(model, val_batches, token_bytes, ctx)}

        def core_metric() -> dict:
            tasks = core.load_core_tasks(self.core_bundle)
            counts = {}
            with torch.inference_mode(), ctx:
                for task in tasks:
                    mine = core.select_indices(task, cfg.core_max_per_task)[rank::world_size]
                    local = core.evaluate_task(model, tokenizer, task, mine)
                    counts[task.label] = sum_over_workers(torch.tensor(local, device=device)).tolist()
            return {"core": core.core_results(tasks, counts)["core"]}

        return [(cfg.eval_every, val_bpb),
                (cfg.core_every if self.core_bundle else -1, core_metric)]

    def sample_prompts(self, tokenizer: Tokenizer) -> list[list[int]]:
        return [tokenizer.encode(prompt, prepend="<|bos|>") for prompt in SAMPLE_PROMPTS]


def start_state(stage_dir: Path, resume: bool) -> tuple[int, dict]:
    """(step, data position) the run starts from: the latest checkpoint's with --resume."""
    step = latest_step(stage_dir) if resume else None
    if step is None:
        return 0, TrainState().data_position
    meta = json.loads((stage_dir / step_name(step) / META_FILE).read_text())
    return meta["train_state"]["step"], meta["train_state"]["data_position"]


def pretrain(cfg: Config, run: RunOptions, *, train_shards: list[Path], val_shard: Path,
             core_bundle: Path | None = None, callbacks: list | None = None, stage_dir: Path | None = None,
             feeder_options: dict | None = None) -> dict:
    """Run base pretraining with Ray Train; returns the final metrics and checkpoint path.

    Every input is checked before Ray starts (a local Ray is started when none is running);
    `stage_dir` is what check_stage returned when the caller checked already (jobs/pretrain.py,
    before its downloads). `core_bundle` (the DCLM eval bundle directory) is needed when
    cfg.core_every > 0. `callbacks` go to Ray Train's RunConfig (jobs/sweep.py forwards each
    report to Tune this way). `feeder_options` are Ray actor options of the BatchFeeder (e.g. a
    scheduling strategy that keeps it on the head).
    """
    stage_dir = stage_dir or check_stage(cfg, "base", run)
    row_groups(train_shards + [val_shard])  # a missing or corrupt shard fails here, by name
    if cfg.core_every > 0 and core_bundle is None:
        raise ConfigError("core_every > 0 needs the CORE eval bundle (core_bundle); or pass --core-every -1")
    init_ray()
    startup.mark("ray")
    feeder = BatchFeeder.options(**(feeder_options or {})).remote(
        [str(p) for p in train_shards], str(run.tokenizer_dir), cfg.seq_len, run.data_actors, run.data_actor_cpus)
    # the pipeline reads the first step's rows while the workers start (rank 0's reset is then a no-op)
    step, position = start_state(stage_dir, run.resume)
    startup.mark("pipeline")
    feeder.reset.remote(position, step, run.num_workers, rows_per_slice(cfg, run.num_workers))
    data = PretrainData(feeder, str(run.tokenizer_dir), str(val_shard), str(core_bundle) if core_bundle else None)
    # Ray Train (with pandas and Ray Data: over a second of imports) is imported once the feeder's
    # process is starting, so that its start-up runs on another core meanwhile
    from nanochat_ray.train.worker import TrainSpec, fit

    try:
        return fit(TrainSpec("base", cfg, stage_dir, data, resume=run.resume, fail_at_step=run.fail_at_step), run,
                   callbacks=callbacks)
    finally:
        ray.kill(feeder)
