"""
RL throughput on CPU: rollout tokens/s with 1 and 2 rollout actors, learner step time and the
time rollout actors sit idle, for a depth-4 model (the `cpu` preset, vocab 65,536).

    python bench/rl.py [--actors 1 2] [--steps 4] [--questions 4] [--samples 8] [--max-new-tokens 64]

The model is freshly initialised (saved as the `sft` stage of a temp artifact root): its zero
lm_head makes every token equally likely, so completions run to max-new-tokens and every step
does the same work. The first step is a warm-up; figures are medians over the rest. Each actor
and the learner reserve one CPU (one torch thread each).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq
import ray
import torch

from nanochat_ray.checkpoint import checkpoint_dir, save_checkpoint
from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.rl.driver import RLOptions, rl_train
from nanochat_ray.stage import RunOptions
from nanochat_ray.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA",
                                                              Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    os.environ["NANOCHAT_BASE_DIR"] = str(root)
    texts = pq.read_table(Path(args.data_root) / "pretrain_text" / "shard_00000.parquet").column("text").to_pylist()
    Tokenizer.train_from_iterator(texts, vocab_size=65536).save(root / "tokenizer")
    cfg = make_config("cpu", num_iterations=args.steps, eval_every=0, save_every=0, init_lr_frac=0.05,
                      warmdown_ratio=1.0)
    torch.manual_seed(0)
    save_checkpoint(checkpoint_dir("sft", cfg.model_tag), 0, build_gpt(cfg.gpt_config()).state_dict(), None,
                    {"model_config": dataclasses.asdict(cfg.gpt_config())})
    ray.init(num_cpus=max(args.actors) + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": str(root), "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    print(f"depth {cfg.depth} (UNTRAINED), {args.questions} GSM8K questions x {args.samples} samples x "
          f"{args.max_new_tokens} tokens per step, {args.steps} steps; {os.cpu_count()} CPUs")
    print(f"{'actors':>6} | {'rollout tok/s':>13} | {'learner s':>9} | {'step s':>7} | {'idle':>5}")
    for n in args.actors:
        options = RLOptions(questions_per_step=args.questions, samples_per_question=args.samples,
                            max_new_tokens=args.max_new_tokens, num_rollout_actors=n)
        result = rl_train(cfg, options, RunOptions(tokenizer_dir=root / "tokenizer", data_root=str(args.data_root),
                                                   fresh=True))
        steps = result["history"][1:] or result["history"]  # the first step warms up

        def median(key: str) -> float:
            return statistics.median(m[key] for m in steps)
        print(f"{n:>6} | {median('rollout_tokens_per_second'):>13,.0f} | {median('learner_seconds'):>9.2f} | "
              f"{median('step_seconds'):>7.2f} | {100 * median('rollout_idle_fraction'):>4.0f}%", flush=True)


if __name__ == "__main__":
    main()
