"""Command-line flags shared by the training jobs (jobs/pretrain.py, midtrain.py, sft.py)."""

import argparse
import os
from pathlib import Path

from nanochat_ray.common import add_verbose_flag, base_dir
from nanochat_ray.config import add_config_args


def training_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, bf16, compile")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved by each worker")
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


def add_data_actor_args(parser: argparse.ArgumentParser) -> None:
    """The Ray Data actor pool that tokenizes (pretraining) or renders (mid, sft) the training rows."""
    parser.add_argument("--data-actors", type=int, default=1, help="actors in the Ray Data pool")
    parser.add_argument("--data-actor-cpus", type=float, default=None,
                        help="CPUs reserved by each data actor (default 1 with GPUs; 0 on CPU-only "
                             "runs, where the actors share the workers' cores instead of starving them)")


def data_actor_options(args: argparse.Namespace) -> dict:
    """data_actors and data_actor_cpus for pretrain() and chat_train()."""
    cpus = args.data_actor_cpus if args.data_actor_cpus is not None else float(args.use_gpu)
    return {"data_actors": args.data_actors, "data_actor_cpus": cpus}


def tokenizer_dir(args: argparse.Namespace) -> Path:
    return args.tokenizer_dir or base_dir() / "tokenizer"


SUMMARY_METRICS = ("step", "val_bpb", "loss_ema", "mean_reward", "pass_at_1")


def done_line(result: dict) -> str:
    """What a training job prints at its end: the headline metrics and the checkpoint, one line
    (the whole metrics dict is in the checkpoint's meta.json and metrics.jsonl)."""
    metrics = result["metrics"] or {}
    shown = ", ".join(f"{name} {value:,}" if isinstance(value, int) else f"{name} {value:.4f}"
                      for name in SUMMARY_METRICS if (value := metrics.get(name)) is not None)
    return f"done: {shown or 'no new steps'}; checkpoint {result['checkpoint']}"
