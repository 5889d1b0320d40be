"""
Base-model pretraining job: Ray Data streams tokenized shards while a Ray Train TorchTrainer
trains the GPT with DDP-style distributed optimizers across workers.

    python jobs/pretrain.py --preset cpu --num-workers 2 --total-batch-size 2048
    ray job submit --working-dir . -- python jobs/pretrain.py --preset d20 --num-workers 8 --use-gpu

Needs a tokenizer (jobs/tokenizer.py) and the pretraining shards (downloaded or in --data-root).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.common import init_ray
from nanochat_ray.config import config_from_args
from nanochat_ray.data.download import shards_needed, start_downloads, train_and_val_shards
from nanochat_ray.data.registry import resolve
from nanochat_ray.train.cli import run_options, training_parser
from nanochat_ray.train.pretrain import pretrain
from nanochat_ray.stage import check_stage


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__)
    parser.add_argument("--num-shards", type=int, default=None,
                        help="pretraining shards to use, val included (default: enough for the horizon)")
    parser.add_argument("--data-actors", type=int, default=1, help="tokenizer actors in the Ray Data pool")
    parser.add_argument("--data-actor-cpus", type=float, default=None,
                        help="CPUs reserved by each tokenizer actor (default 1 with GPUs; 0 on CPU-only "
                             "runs, where the actors share the workers' cores instead of starving them)")
    args = parser.parse_args(argv)
    cfg, run = config_from_args(args), run_options(args)
    stage_dir = check_stage(cfg, "base", run)  # before Ray starts
    init_ray()
    # shards already fetched by jobs/tokenizer.py are skipped; a mirror's are used in place
    downloads = start_downloads(args.num_shards or shards_needed(cfg), args.data_root)
    train_shards, val_shard = train_and_val_shards(downloads.paths)
    downloads.wait()
    core_bundle = resolve("core_eval_bundle", "all", args.data_root) if cfg.core_every > 0 else None
    data_actor_cpus = args.data_actor_cpus if args.data_actor_cpus is not None else float(args.use_gpu)
    result = pretrain(cfg, run, train_shards=train_shards, val_shard=val_shard, data_actors=args.data_actors,
                      data_actor_cpus=data_actor_cpus, core_bundle=core_bundle, stage_dir=stage_dir)
    print(f"done: {result['metrics']}\ncheckpoint: {result['checkpoint']}")
    return result


if __name__ == "__main__":
    main()
