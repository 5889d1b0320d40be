"""
Base-model evaluation (SPEC §6): bits per byte on a train and the val shard, greedy samples
from fixed prompts, and CORE over the 22 DCLM tasks, sharded over Ray actors.

    python jobs/base_eval.py --preset cpu --max-per-task 20
    ray job submit --working-dir . -- python jobs/base_eval.py --preset d20 --num-actors 8 --use-gpu

Evaluates the latest `base` checkpoint of the model (a freshly initialised model, labelled as
such, when there is none). Writes <base dir>/evals/base_<tag>.json and core_<tag>.csv. Each
finished part (bpb, samples, every CORE task) is kept in base_<tag>.progress.json until then, so
re-running after a crash skips it.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ray

from nanochat_ray.common import default_tokenizer_dir, eval_results_path, init_ray
from nanochat_ray.config import config_from_args
from nanochat_ray.data.download import shard_paths, train_and_val_shards
from nanochat_ray.data.registry import resolve
from nanochat_ray.evals.actors import run_core, save_results, start_eval_actors
from nanochat_ray.evals.core import write_results_csv
from nanochat_ray.evals.evaluator import Progress, eval_parser, evals_dir
from nanochat_ray.stage import SAMPLE_PROMPTS


def main(argv: list[str] | None = None) -> dict:
    args = eval_parser(__doc__).parse_args(argv)
    cfg = config_from_args(args)
    tokenizer_dir = args.tokenizer_dir or default_tokenizer_dir()
    bundle = resolve("core_eval_bundle", "all", args.data_root)
    train_shards, val_shard = train_and_val_shards(shard_paths(3, args.data_root))
    init_ray()
    start = time.time()
    actors = start_eval_actors("base", cfg, tokenizer_dir, args.data_root, args.num_actors, args.use_gpu,
                               args.cpus_per_actor, allow_untrained=args.allow_untrained)
    label = ray.get(actors[0].describe.remote())
    print(f"evaluating {label}")
    name = eval_results_path("base", cfg.model_tag).stem
    progress = Progress(evals_dir() / f"{name}.progress.json",
                        {"model": label, "max_per_task": args.max_per_task, "config": cfg.to_dict(),
                         "shards": [str(train_shards[0]), str(val_shard)]})
    bpb = progress.get_or_run("bpb", lambda: dict(zip(("train_bpb", "val_bpb"), ray.get(
        [actors[0].bpb.remote(str(train_shards[0])), actors[-1].bpb.remote(str(val_shard))]))))
    print(f"bpb: train {bpb['train_bpb']:.4f}, val {bpb['val_bpb']:.4f}")
    samples = progress.get_or_run("samples", lambda: ray.get(actors[0].samples.remote(SAMPLE_PROMPTS)))
    for prompt, text in samples.items():
        print(f"  {prompt!r} -> {text!r}")
    print(f"CORE ({args.max_per_task or 'all'} examples per task, {args.num_actors} actor(s)):")
    core = run_core(actors, bundle, args.max_per_task, progress)
    print(f"CORE {core['core']:.4f} in {time.time() - start:.0f}s")
    results = {"model": label, **bpb, "samples": samples, "core": core["core"], "core_tasks": core["tasks"],
               "max_per_task": args.max_per_task, "seconds": time.time() - start}
    write_results_csv(core, evals_dir() / f"core_{cfg.model_tag}.csv")
    print(f"results: {save_results(results, name)}")
    progress.finish()
    return results


if __name__ == "__main__":
    main()
