"""
Hyperparameter sweep over base pretraining with Ray Tune: a grid over config fields (matrix LR ×
embedding LR unless --grid says otherwise), one real pretraining run per trial (a TorchTrainer fed
by the Ray Data pipeline, as jobs/pretrain.py runs it), and ASHA stopping the trials whose val bits
per byte fall behind at each rung.

    python jobs/sweep.py --preset smoke --grid matrix_lr=0.005,0.02,0.08 --grid embedding_lr=0.05,0.2
    ray job submit --working-dir . -- python jobs/sweep.py --preset d20 --num-iterations 2000 \
        --eval-every 250 --num-workers 8 --use-gpu --grid matrix_lr=0.01,0.02,0.04

Each trial trains under <base dir>/sweeps/<name>/<trial id>, never over the real base checkpoints.
The end prints one row per trial (config, last val bpb, steps, stopped early?) and the best config.
"""

import dataclasses
import sys
import time
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ray

from nanochat_ray.common import base_dir, init_ray
from nanochat_ray.config import ConfigError, config_from_args, validate
from nanochat_ray.data.download import shards_needed, start_downloads, train_and_val_shards
from nanochat_ray.data.registry import resolve
from nanochat_ray.train.cli import run_options, training_parser
from nanochat_ray.train.sweep import METRIC, best_trial, parse_grid, print_table, sweep
from nanochat_ray.stage import check_stage


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__)
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                        help="values of one config field to try (repeat for a grid); default: matrix_lr × "
                             "embedding_lr at 1/4, 1 and 4 times the preset's values")
    parser.add_argument("--name", default=None, help="sweep name (default: sweep-<model tag>-<time>)")
    parser.add_argument("--max-concurrent-trials", type=int, default=None,
                        help="trials running at once (default: as many as the cluster's GPUs or CPUs hold)")
    parser.add_argument("--grace-period", type=int, default=None,
                        help="steps before ASHA may stop a trial (default: eval_every, the first val bpb)")
    parser.add_argument("--reduction-factor", type=float, default=2.0,
                        help="ASHA keeps the best 1/factor of the trials at each rung")
    parser.add_argument("--num-shards", type=int, default=None, help="pretraining shards, val included")
    parser.add_argument("--data-actors", type=int, default=1, help="tokenizer actors per trial")
    args = parser.parse_args(argv)
    if args.resume or args.fresh:
        parser.error("--resume/--fresh do not apply to a sweep: every sweep trains in a new directory (--name)")
    base = config_from_args(args)
    grid = parse_grid(args.grid, base)
    # every trial's config is checked before Ray starts
    configs = [dataclasses.replace(base, **dict(zip(grid, values))) for values in product(*grid.values())]
    for cfg in configs:
        validate(cfg, world_size=args.num_workers)
    if base.eval_every <= 0:
        raise ConfigError("the sweep ranks trials on val bpb: set --eval-every to a positive number of steps")
    grace = args.grace_period or base.eval_every
    shortest = min(c.horizon() for c in configs)
    if grace >= shortest:
        raise ConfigError(f"grace period {grace} steps leaves no rung before the horizon ({shortest} steps): "
                          f"lower --grace-period or --eval-every, or raise --num-iterations")
    name = args.name or f"sweep-{base.model_tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = base_dir() / "sweeps" / name
    run = run_options(args)
    check_stage(base, "base", dataclasses.replace(run, artifact_root=root))  # the tokenizer fits

    init_ray()
    downloads = start_downloads(args.num_shards or max(map(shards_needed, configs)), args.data_root)
    train_shards, val_shard = train_and_val_shards(downloads.paths)
    downloads.wait()
    per_trial = {"GPU": args.num_workers} if args.use_gpu else {"CPU": args.num_workers * args.cpus_per_worker}
    fits = min(int(ray.cluster_resources().get(kind, 0) // amount) for kind, amount in per_trial.items())
    concurrent = args.max_concurrent_trials or max(1, fits)
    print(f"sweep {name}: {len(configs)} trials over {', '.join(grid)}, {concurrent} at a time, "
          f"ASHA on {METRIC} from step {grace} (reduction factor {args.reduction_factor:g})", flush=True)
    rows = sweep(base, grid, name=name, root=root, run=run, grace_period=grace, reduction_factor=args.reduction_factor,
                 max_concurrent_trials=concurrent, train_shards=train_shards, val_shard=val_shard,
                 core_bundle=resolve("core_eval_bundle", "all", args.data_root) if base.core_every > 0 else None)
    print_table(rows, grid)
    best = best_trial(rows)
    print(f"best: {', '.join(f'{k}={best[k]}' for k in grid)} (val bpb {best[METRIC]:.4f} at step {best['step']})")
    return {"name": name, "trials": rows, "best": best}


if __name__ == "__main__":
    main()
