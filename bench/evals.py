"""
CORE evaluation throughput: examples/s of a depth-4 model (random init, vocab 65,536) on CPU,
with 1 and 2 Ray actors, over a few of the cheaper CORE tasks.

    python bench/evals.py [--tasks copa piqa winograd arc_easy lambada_openai] [--per-task 8]

(Sandbox throughput for HumanEval: bench/sandbox.py.)
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq
import ray

from nanochat_ray.config import make_config
from nanochat_ray.data.registry import resolve
from nanochat_ray.evals import core
from nanochat_ray.evals.actors import start_eval_actors
from nanochat_ray.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["copa", "piqa", "winograd", "arc_easy", "lambada_openai"])
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA",
                                                              Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-evals-"))
    os.environ["NANOCHAT_BASE_DIR"] = str(root)
    texts = pq.read_table(Path(args.data_root) / "pretrain_text" / "shard_00000.parquet").column("text").to_pylist()
    Tokenizer.train_from_iterator(texts, vocab_size=65536).save(root / "tokenizer")
    cfg = make_config("cpu")
    tasks = [t for t in core.load_core_tasks(resolve("core_eval_bundle", "all", args.data_root)) if t.label in args.tasks]
    work = {t.label: core.select_indices(t, args.per_task) for t in tasks}
    examples = sum(len(v) for v in work.values())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": str(root)}})
    print(f"depth {cfg.depth} (UNTRAINED), {examples} examples over {', '.join(work)}; {os.cpu_count()} CPUs")
    for n in args.actors:
        actors = start_eval_actors("base", cfg, root / "tokenizer", str(args.data_root), n, allow_untrained=True)
        ray.get([a.describe.remote() for a in actors])  # model loaded: time the evaluation only
        start = time.perf_counter()
        refs = [actor.core.remote(task, work[task.label][i::n]) for task in tasks for i, actor in enumerate(actors)]
        ray.get(refs)
        seconds = time.perf_counter() - start
        print(f"{n} actor(s): {examples / seconds:.2f} examples/s ({seconds:.1f} s)")
        for actor in actors:
            ray.kill(actor)


if __name__ == "__main__":
    main()
