"""
What the speedrun's evaluation stages spend their time on, part by part, in one process with one
thread (an evaluation actor on the `cpu` preset gets one CPU): the `cpu` preset's depth-4 model
(random init, vocab 65,536, a tokenizer trained on the first pretraining shard), the speedrun's
caps (CORE 8 examples per task; chat evals 12 problems per task, at most 128 new tokens).

    python bench/eval_stages.py                    # base_eval's parts, then chat_eval's
    python bench/eval_stages.py --parts core       # one part: valrows bpb samples core categorical generative

Prints wall and CPU seconds per part. On a loaded machine compare CPU seconds, and run the old
and new code back to back (e.g. `git stash` between runs).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq
import torch

from nanochat_ray.common import cpu_description
from nanochat_ray.config import make_config
from nanochat_ray.data.download import shard_paths, train_and_val_shards
from nanochat_ray.data.registry import resolve
from nanochat_ray.evals import core
from nanochat_ray.evals.evaluator import Evaluator
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.data.rows import val_rows
from nanochat_ray.stage import SAMPLE_PROMPTS

PARTS = ("valrows", "bpb", "samples", "core", "categorical", "generative")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--core-per-task", type=int, default=8)
    parser.add_argument("--chat-per-task", type=int, default=12)
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA",
                                                              Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-eval-stages-"))
    texts = pq.read_table(Path(args.data_root) / "pretrain_text" / "shard_00000.parquet").column("text").to_pylist()
    Tokenizer.train_from_iterator(texts, vocab_size=65536).save(root / "tokenizer")
    cfg = make_config("cpu")
    evaluator = Evaluator("base", cfg, str(root / "tokenizer"), str(args.data_root), str(root), allow_untrained=True)
    train_shards, val_shard = train_and_val_shards(shard_paths(3, str(args.data_root)))
    tasks = core.load_core_tasks(resolve("core_eval_bundle", "all", args.data_root))
    chat = {"categorical": ["ARC-Easy", "ARC-Challenge", "MMLU"], "generative": ["GSM8K", "HumanEval", "SpellingBee"]}
    work = {
        "valrows": lambda: [val_rows(str(s), evaluator.tokenizer, cfg, 0, 1) for s in (train_shards[0], val_shard)],
        "bpb": lambda: [evaluator.bpb(str(s)) for s in (train_shards[0], val_shard)],
        "samples": lambda: evaluator.samples(SAMPLE_PROMPTS),
        "core": lambda: [evaluator.core(t, core.select_indices(t, args.core_per_task)) for t in tasks],
        **{kind: (lambda names=names: [evaluator.chat(name, list(range(args.chat_per_task)), max_tokens=128)
                                       for name in names]) for kind, names in chat.items()},
    }
    print(f"cpu preset, depth {cfg.depth} (UNTRAINED), 1 thread; CPU {cpu_description()}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'part':<12}{'wall':>9}{'CPU':>9}  what")
    what = {"valrows": "tokenize the train and val shards' first eval_tokens (base_eval; bpb below includes it)",
            "bpb": f"bits per byte on 2 shards, {cfg.eval_tokens:,} tokens each",
            "samples": f"{len(SAMPLE_PROMPTS)} greedy samples of 16 tokens",
            "core": f"CORE, 22 tasks x {args.core_per_task}",
            "categorical": f"ARC-E, ARC-C, MMLU x {args.chat_per_task}",
            "generative": f"GSM8K, HumanEval, SpellingBee x {args.chat_per_task}, <= 128 new tokens"}
    for part in args.parts:
        wall, cpu = time.perf_counter(), cpu_seconds()
        work[part]()
        print(f"{part:<12}{time.perf_counter() - wall:>8.1f}s{cpu_seconds() - cpu:>8.1f}s  {what[part]}", flush=True)


if __name__ == "__main__":
    main()
