"""
Ray Tune over base pretraining (the Ray edge of jobs/sweep.py): every trial is one real pretraining
run (train/pretrain.py: a TorchTrainer fed by the Ray Data pipeline), and ASHA stops the trials whose
val bits per byte fall behind at a rung.

    rows = sweep(cfg, {"matrix_lr": [0.01, 0.02]}, name="lr", root=Path("sweeps/lr"), grace_period=250,
                 run=RunOptions(tokenizer_dir=...), train_shards=..., val_shard=...)   # + any other pretrain() option

Ray 2.60 runs Train inside Tune as `Tuner(function)` whose function calls TorchTrainer.fit(); Train's
reports reach Tune only through a callback (EvalsToTune, below).

Run by: python jobs/sweep.py --preset smoke.
"""

import dataclasses
import os
from itertools import product
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from nanochat_ray.config import Config, ConfigError
from nanochat_ray.stage import RunOptions
from nanochat_ray.train.pretrain import pretrain

METRIC = "val_bpb"  # lower is better
DEFAULT_GRID = {"matrix_lr": (0.25, 1.0, 4.0), "embedding_lr": (0.25, 1.0)}  # × the preset's value


def parse_grid(items: list[str], cfg: Config) -> dict[str, list]:
    """["matrix_lr=0.01,0.02", ...] → {"matrix_lr": [0.01, 0.02]}, typed like the config field."""
    if not items:
        return {name: [getattr(cfg, name) * factor for factor in factors] for name, factors in DEFAULT_GRID.items()}
    fields = {f.name for f in dataclasses.fields(Config)}
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in fields or not values:
            raise ConfigError(f"--grid {item!r}: expected FIELD=V1,V2,... with FIELD one of {', '.join(sorted(fields))}")
        kind = type(getattr(cfg, name))
        try:
            grid[name] = [kind(value) for value in values.split(",")]
        except ValueError:
            raise ConfigError(f"--grid {item!r}: {name} takes {kind.__name__} values") from None
    return grid


class EvalsToTune(TuneReportCallback):
    """Runs in the trial's Ray Train controller. Forwards the reports that carry val bpb (every
    eval_every steps) to Tune: ASHA ranks trials on them, and Tune rejects a result that lacks the
    metric it optimises. First tells the trial's actor which controller to abort if ASHA stops it."""

    def __init__(self):
        super().__init__()
        self._trial = ray.get_runtime_context().current_actor
        self._introduced = False

    def after_report(self, run_context, metrics, checkpoint):
        if not self._introduced:
            self._trial.adopt_train_controller.remote(ray.get_runtime_context().current_actor)
            self._introduced = True
        if METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class AbortTrainOnStop:
    """Mixed into the trial's actor. When Tune stops the trial, end its Ray Train run first: killing
    the trial alone kills the controller but leaves the run's placement group (its workers' CPUs or
    GPUs) reserved until the sweep's driver exits, because Ray Train's PlacementGroupCleaner can
    free it only where the dashboard serves the State API."""

    _train_controller = None

    def adopt_train_controller(self, controller: "ray.actor.ActorHandle") -> None:
        self._train_controller = controller

    def cleanup(self):
        try:
            super().cleanup()
        finally:
            if self._train_controller is not None:
                try:  # stops the workers, removes the placement group, then ends the controller
                    ray.get(self._train_controller.abort.remote(), timeout=60)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # the controller was already gone (a finished run) or is going


@dataclass
class Trials:
    """What every trial shares; each one overrides the grid's fields of `cfg`."""
    cfg: Config
    root: Path  # <base dir>/sweeps/<name>
    run: RunOptions  # workers, tokenizer; each trial's artifact root is its own directory under root
    options: dict  # pretrain()'s other keyword arguments: shards, data actors, CORE bundle


def run_trial(params: dict, trials: Trials) -> None:
    cfg = dataclasses.replace(trials.cfg, **params)
    trial = tune.get_context().get_trial_id()
    pretrain(cfg, dataclasses.replace(trials.run, artifact_root=trials.root / trial), callbacks=[EvalsToTune()],
             **trials.options)


run_trial.__mixins__ = (AbortTrainOnStop,)  # Tune builds the trial's actor class from these + the function


# -----------------------------------------------------------------------------
# the driver


def sweep(cfg: Config, grid: dict[str, list], *, name: str, root: Path, run: RunOptions, grace_period: int,
          reduction_factor: float = 2.0, max_concurrent_trials: int = 1, **pretrain_options) -> list[dict]:
    """Run one pretraining per point of `grid` (each a dataclasses.replace of cfg) under
    root/<trial id>, ASHA stopping laggards; returns table_rows() of the trials."""
    configs = {values: dataclasses.replace(cfg, **dict(zip(grid, values))) for values in product(*grid.values())}
    horizons = {values: c.horizon() for values, c in configs.items()}
    trials = Trials(cfg, root, run, pretrain_options)
    tuner = tune.Tuner(
        # the trial's own actor only waits on its TorchTrainer, whose workers hold the real resources
        tune.with_resources(tune.with_parameters(run_trial, trials=trials), {"CPU": 0.01}),
        param_space={field: tune.grid_search(values) for field, values in grid.items()},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent_trials,
            # rungs at grace·factor^k below the longest horizon: a trial's last report is never a rung,
            # so a trial that reaches its horizon finishes (and saves) normally
            scheduler=ASHAScheduler(time_attr="step", metric=METRIC, mode="min", max_t=max(horizons.values()) - 1,
                                    grace_period=grace_period, reduction_factor=reduction_factor,
                                    stop_last_trials=False)),
        run_config=tune.RunConfig(name=name, storage_path=str(root.parent / "tune"), verbose=1),
    )
    return table_rows(tuner.fit(), grid, horizons)


def table_rows(results: tune.ResultGrid, grid: dict, horizons: dict[tuple, int]) -> list[dict]:
    """One row per trial: its grid values, last val bpb and step, and whether ASHA stopped it."""
    rows = []
    for result in results:
        params = {k: result.config[k] for k in grid}
        metrics = result.metrics or {}
        step, full = metrics.get("step", 0), horizons[tuple(params.values())]
        rows.append({"trial": metrics.get("trial_id", os.path.basename(result.path)), **params,
                     METRIC: metrics.get(METRIC), "step": step, "horizon": full,
                     "stopped_early": result.error is None and step < full,
                     "error": None if result.error is None else (str(result.error).splitlines() or ["error"])[0]})
    return sorted(rows, key=lambda r: r["trial"])


def print_table(rows: list[dict], grid: dict) -> None:
    header = ["trial", *grid, "val bpb", "steps", "stopped early"]
    lines = [[r["trial"], *(f"{r[k]:g}" for k in grid), "-" if r[METRIC] is None else f"{r[METRIC]:.4f}",
              f"{r['step']}/{r['horizon']}", r["error"] or ("yes" if r["stopped_early"] else "no")] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    for line in [header, *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)), flush=True)


def best_trial(rows: list[dict]) -> dict:
    """The lowest final val bpb among the trials that ran to the end (else among all that reported)."""
    reported = [r for r in rows if r[METRIC] is not None]
    if not reported:
        raise RuntimeError(f"every trial failed; the first error: {rows[0]['error']}")
    return min([r for r in reported if not r["stopped_early"]] or reported, key=lambda r: r[METRIC])
