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

from nanochat_ray.common import base_dir, init_ray
from nanochat_ray.config import add_config_args, config_from_args
from nanochat_ray.data.download import shards_needed, start_downloads, train_and_val_shards
from nanochat_ray.train.pretrain import check_run, pretrain


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, bf16, compile")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved by each worker")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA"),
                        help="local mirror laid out like shared/data (env NANOCHAT_DATA)")
    parser.add_argument("--tokenizer-dir", default=None, help="default: <base dir>/tokenizer")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="pretraining shards to use, val included (default: enough for the horizon)")
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
    tokenizer_dir = Path(args.tokenizer_dir or base_dir() / "tokenizer")
    check_run(cfg, tokenizer_dir, args.num_workers, args.resume, args.fresh)  # before Ray starts
    init_ray()
    # shards already fetched by jobs/tokenizer.py are skipped; a mirror's are used in place
    downloads = start_downloads(args.num_shards or shards_needed(cfg), args.data_root)
    train_shards, val_shard = train_and_val_shards(downloads.paths)
    downloads.wait()
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
