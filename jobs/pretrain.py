"""
Base-model pretraining job: Ray Data streams tokenized shards while a Ray Train TorchTrainer
trains the GPT with DDP-style distributed optimizers across workers.

    python jobs/pretrain.py --preset cpu --num-workers 2
    ray job submit --working-dir . -- python jobs/pretrain.py --preset d20 --num-workers 8 --use-gpu

Needs a tokenizer (jobs/tokenizer.py) and the pretraining shards (downloaded or in --data-root).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.common import base_dir
from nanochat_ray.config import add_config_args, config_from_args, validate
from nanochat_ray.data.registry import pretrain_shards
from nanochat_ray.train.pretrain import pretrain


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, bf16, compile")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved by each worker")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA"),
                        help="local mirror laid out like shared/data (env NANOCHAT_DATA)")
    parser.add_argument("--tokenizer-dir", default=None, help="default: <base dir>/tokenizer")
    parser.add_argument("--data-actors", type=int, default=1, help="tokenizer actors in the Ray Data pool")
    parser.add_argument("--data-actor-cpus", type=float, default=None,
                        help="CPUs reserved by each tokenizer actor (default 1 with GPUs; 0 on CPU-only "
                             "runs, where the actors share the workers' cores instead of starving them)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this model")
    parser.add_argument("--fresh", action="store_true", help="move an existing run aside and start over")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    parser.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests only
    add_config_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = config_from_args(args)
    validate(cfg, world_size=args.num_workers)  # before Ray starts
    shards = pretrain_shards(args.data_root)
    if len(shards) < 2:
        raise SystemExit(f"need at least 2 pretraining shards (train + val), found {len(shards)}: "
                         "run jobs/tokenizer.py to download them or pass --data-root")
    train_shards, val_shard = shards[:-1], shards[-1]  # the last shard is the validation split
    tokenizer_dir = Path(args.tokenizer_dir or base_dir() / "tokenizer")
    result = pretrain(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                      train_shards=train_shards, val_shard=val_shard, tokenizer_dir=tokenizer_dir,
                      resume=args.resume, fresh=args.fresh, max_failures=args.max_failures,
                      data_actors=args.data_actors,
                      data_actor_cpus=args.data_actor_cpus if args.data_actor_cpus is not None else float(args.use_gpu),
                      fail_at_step=args.fail_at_step)
    print(f"done: {result['metrics']}\ncheckpoint: {result['checkpoint']}")
    return result


if __name__ == "__main__":
    main()
