"""
Base-model pretraining job: Ray Data streams tokenized shards while a Ray Train TorchTrainer
trains the GPT with DDP-style distributed optimizers across workers.

    python jobs/pretrain.py --preset cpu --num-workers 2 --total-batch-size 2048
    ray job submit --working-dir . -- python jobs/pretrain.py --preset d20 --num-workers 8 --use-gpu

Needs a tokenizer (jobs/tokenizer.py) and the pretraining shards (downloaded or in --data-root).
"""

import time

LAUNCHED = time.time()  # before the imports below: they are part of the start-up breakdown

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.common import init_ray
from nanochat_ray.config import config_from_args
from nanochat_ray.data.download import shards_needed, start_downloads, train_and_val_shards
from nanochat_ray.data.registry import resolve
from nanochat_ray.stage import check_stage
from nanochat_ray.train import startup
from nanochat_ray.train.cli import add_trainer_args, done_line, run_options, training_parser
from nanochat_ray.train.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    startup.mark("process", LAUNCHED)
    startup.mark("main")
    parser = training_parser(__doc__)
    parser.add_argument("--num-shards", type=int, default=None,
                        help="pretraining shards to use, val included (default: enough for the horizon)")
    add_trainer_args(parser)
    args = parser.parse_args(argv)
    cfg, run = config_from_args(args), run_options(args)
    stage_dir = check_stage(cfg, "base", run)  # before Ray starts
    init_ray()
    startup.mark("ray")
    # shards already fetched by jobs/tokenizer.py are skipped; a mirror's are used in place
    downloads = start_downloads(args.num_shards or shards_needed(cfg), args.data_root)
    train_shards, val_shard = train_and_val_shards(downloads.paths)
    downloads.wait()
    core_bundle = resolve("core_eval_bundle", "all", args.data_root) if cfg.core_every > 0 else None
    result = pretrain(cfg, run, train_shards=train_shards, val_shard=val_shard, core_bundle=core_bundle,
                      stage_dir=stage_dir)
    print(done_line(result))
    return result


if __name__ == "__main__":
    main()
