"""Command-line flags shared by the training jobs (python jobs/pretrain.py, midtrain.py, sft.py, rl.py), and
the RunOptions built from them once."""

import argparse
import os
from pathlib import Path

from nanochat_ray.common import default_tokenizer_dir
from nanochat_ray.config import add_config_args
from nanochat_ray.stage import RunOptions


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
    return parser


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(tokenizer_dir=args.tokenizer_dir or default_tokenizer_dir(), data_root=args.data_root,
                      num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                      resume=args.resume, fresh=args.fresh, max_failures=args.max_failures,
                      fail_at_step=args.fail_at_step)
