"""Command-line flags shared by the training jobs (python jobs/pretrain.py, midtrain.py, sft.py, rl.py), and
the RunOptions built from them once."""

import argparse
import os
from pathlib import Path

from nanochat_ray.common import add_verbose_flag, default_tokenizer_dir
from nanochat_ray.config import add_config_args
from nanochat_ray.stage import PLACEMENT_STRATEGIES, RunOptions


def training_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, bf16, compile")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs reserved by each worker (default 1; pretraining, mid and SFT without GPUs: the "
                             "cluster's free CPUs when the stage starts, shared over the workers, at most a node's)")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA"),
                        help="local mirror laid out like shared/data (env NANOCHAT_DATA)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: <base dir>/tokenizer")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this stage")
    parser.add_argument("--fresh", action="store_true", help="move an existing run of this stage aside, start over")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    parser.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests only
    add_config_args(parser)
    add_verbose_flag(parser)
    return parser


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    """The Ray Train stages' own flags (pretraining, mid, sft): the Ray Data actor pool that
    tokenizes (pretraining) or renders (mid, sft) the training rows, and the workers' placement."""
    parser.add_argument("--data-actors", type=int, default=1, help="actors in the Ray Data pool")
    parser.add_argument("--data-actor-cpus", type=float, default=None,
                        help="CPUs reserved by each data actor (default 1 with GPUs; 0 on CPU-only "
                             "runs, where the actors share the workers' cores instead of starving them)")
    parser.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES, default="PACK",
                        help="how the workers are placed over nodes: PACK (fewest nodes), SPREAD (most nodes), "
                             "STRICT_* (wait until that holds)")
    # a CPU-only stage alone on its machine uses its cores: Ray gives an actor's torch as many threads
    # as it reserves CPUs, and one reserved CPU left a 2-core machine's second core to the data actors
    parser.set_defaults(cpus_per_worker=None)


def run_options(args: argparse.Namespace) -> RunOptions:
    """RunOptions from the parsed flags (those of add_trainer_args where the job has them)."""
    data_actor_cpus = getattr(args, "data_actor_cpus", None)
    return RunOptions(tokenizer_dir=args.tokenizer_dir or default_tokenizer_dir(), data_root=args.data_root,
                      num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                      resume=args.resume, fresh=args.fresh, max_failures=args.max_failures,
                      fail_at_step=args.fail_at_step, data_actors=getattr(args, "data_actors", 1),
                      data_actor_cpus=float(args.use_gpu) if data_actor_cpus is None else data_actor_cpus,
                      placement_strategy=getattr(args, "placement_strategy", "PACK"))


SUMMARY_METRICS = ("step", "val_bpb", "loss_ema", "mean_reward", "pass_at_1")


def done_line(result: dict) -> str:
    """What a training job prints at its end: the headline metrics and the checkpoint, one line
    (the whole metrics dict is in the checkpoint's meta.json and metrics.jsonl)."""
    metrics = result["metrics"] or {}
    shown = ", ".join(f"{name} {value:,}" if isinstance(value, int) else f"{name} {value:.4f}"
                      for name in SUMMARY_METRICS if (value := metrics.get(name)) is not None)
    return f"done: {shown or 'no new steps'}; checkpoint {result['checkpoint']}"
