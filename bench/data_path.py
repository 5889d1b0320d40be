"""
The data path's ceiling: how many tokens/s the feeders (data/pipeline.py) deliver to training
workers, for pretraining, midtraining and SFT, with 1, 2 and 4 Ray Data actors.

    python bench/data_path.py                                   # d20's shapes, 8 workers, the mirror
    python bench/data_path.py --stages mid,sft --actors 1,2 --steps 6 --data-root ../shared/data

The workers are N Ray actors that do what a training worker does with its rows (ask for step s+1,
take step s) except the step itself: a "step" takes no time (a stand-in for a GPU much faster than
the pipeline), so the rate they are served at is the pipeline's ceiling. From it, the steady-state
data-wait fraction at --step-seconds (d20's ~0.5 s): a step lasts as long as the pipeline takes to
make its rows when that is longer than the compute. Then the same workers "compute" (sleep) for
the step time that asks for 90% of the ceiling, and the wait they measure checks the rule below.

Printed per stage and actor count: seconds to the first rows (from the feeder's reset: the actor
pool starting, the mixture loaded), the ceiling in tokens/s (real tokens: SFT's padding is not
counted), the ceiling per actor, and the data-wait fractions. Then, from the 1-actor ceiling (one
actor = one CPU core), the CPU cores per GPU that the d20 run needs for data wait < 1%: d20 on 8
GPUs consumes ~1M tokens/s, so each GPU asks 125K tokens/s, and the pipeline is sized to run at
no more than 90% of its ceiling (prefetching one step ahead then hides it; the 90% column checks
that). Each actor reserves one CPU; on a machine with fewer cores than actors the actors share
them, and the per-actor figures show it.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq
import ray

from nanochat_ray.config import make_config
from nanochat_ray.data.pipeline import BatchFeeder
from nanochat_ray.data.registry import mirror_root
from nanochat_ray.stage import RunOptions
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.train.finetune import Fallbacks, chat_feeder, training_mixture
from nanochat_ray.train.loop import TrainState, real_tokens

D20_TOKENS_PER_SECOND = 1_000_000  # d20 on 8 H100s (issue 16): what the data path must keep up with
D20_GPUS = 8
HEADROOM = 0.9  # the pipeline runs at no more than this fraction of its ceiling


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA"), help="the data mirror (shared/data)")
    parser.add_argument("--stages", default="pretrain,mid,sft")
    parser.add_argument("--actors", default="1,2,4", help="Ray Data actor counts to try")
    parser.add_argument("--workers", type=int, default=8, help="training workers served (d20: 8 GPUs)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows-per-step", type=int, default=64,
                        help="rows (mid, pretrain) or conversations (sft) of a step, over all workers "
                             "(d20 pretraining takes 256; fewer give more steps to measure)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of the ceiling measurement (6 calls of 2 steps at least); its second "
                             "half is measured (the first drains what the pipeline made ahead while it started)")
    parser.add_argument("--steps", type=int, default=16,
                        help="measured steps of the data-wait check (after as many to refill the pipeline)")
    parser.add_argument("--step-seconds", type=float, default=0.5, help="the step time of the data-wait figure")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--tokenizer-dir", default=None, help="an existing tokenizer (default: train one)")
    parser.add_argument("--tokenizer-chars", type=int, default=20_000_000, help="training text of that tokenizer")
    return parser.parse_args(argv)


@ray.remote(num_cpus=0)
class Worker:
    """A training worker whose step takes `step_seconds`: rows asked one step ahead, as feeder_batches does."""

    def __init__(self, rank: int):
        self.rank = rank

    def run(self, feeder, first_step: int, steps: int, step_seconds: float) -> dict:
        waits, tokens = [], 0
        start = time.perf_counter()
        pending = feeder.get.remote(first_step, self.rank)
        for step in range(first_step, first_step + steps):
            asked = time.perf_counter()
            rows, _ = ray.get(pending)
            waits.append(time.perf_counter() - asked)
            if step + 1 < first_step + steps:
                pending = feeder.get.remote(step + 1, self.rank)
            tokens += real_tokens(rows)
            time.sleep(step_seconds)
        return {"seconds": time.perf_counter() - start, "waits": waits, "tokens": tokens}


def phase(workers: list, feeder, first_step: int, steps: int, step_seconds: float) -> dict:
    """Every worker takes `steps` steps: the tokens they got, the time, the mean data-wait fraction."""
    start = time.perf_counter()
    runs = ray.get([w.run.remote(feeder, first_step, steps, step_seconds) for w in workers])
    fractions = [wait / (wait + step_seconds) if wait + step_seconds > 0 else 1.0 for r in runs for wait in r["waits"]]
    return {"start": start, "end": time.perf_counter(), "tokens": sum(r["tokens"] for r in runs),
            "first_wait": max(r["waits"][0] for r in runs), "wait_fraction": statistics.mean(fractions)}


def measure(feeder, workers: list, args: argparse.Namespace) -> dict:
    """First rows, ceiling, and data wait at --step-seconds and at 90% of the ceiling, on one feeder."""
    ray.get(feeder.reset.remote(TrainState().data_position, 0, len(workers), args.rows_per_step // len(workers)))
    chunk = 2  # steps per call: the rate is measured over many calls
    first = phase(workers, feeder, 0, chunk, 0.0)  # the actor pool starts, the mixture loads
    step, chunks = chunk, []
    while len(chunks) < 6 or chunks[-1]["end"] - chunks[0]["start"] < args.seconds:
        chunks.append(phase(workers, feeder, step, chunk, 0.0))
        step += chunk
    measured = chunks[len(chunks) // 2:]
    ceiling = sum(c["tokens"] for c in measured) / (measured[-1]["end"] - measured[0]["start"])
    tokens_per_step = first["tokens"] / chunk
    step_at_90 = tokens_per_step / (HEADROOM * ceiling)
    # the ceiling phase emptied what the pipeline makes ahead: it refills while the first steps run
    phase(workers, feeder, step, args.steps, step_at_90)
    return {"first_rows": first["first_wait"], "ceiling": ceiling, "step_at_90": step_at_90,
            "ceiling_wait": statistics.mean(c["wait_fraction"] for c in measured),
            # in steady state a step lasts as long as the pipeline takes to make its rows, if longer
            # than the compute: the wait is the difference
            "wait_at_step": max(0.0, 1 - ceiling * args.step_seconds / tokens_per_step),
            "wait_at_90": phase(workers, feeder, step + args.steps, args.steps, step_at_90)["wait_fraction"]}


def make_feeder(stage: str, actors: int, args: argparse.Namespace, shards: list[Path], tokenizer_dir: Path,
                mixtures: dict):
    if stage == "pretrain":
        return BatchFeeder.remote([str(s) for s in shards], str(tokenizer_dir), args.seq_len, actors, 1.0)
    size, missing = mixtures[stage]
    run = RunOptions(tokenizer_dir=tokenizer_dir, data_actors=actors, data_actor_cpus=1.0)
    return chat_feeder(stage, make_config("d20", seq_len=args.seq_len), run, str(args.data_root), missing, size)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.data_root = mirror_root(args.data_root)
    if args.data_root is None:
        raise SystemExit("no data mirror: pass --data-root (a copy of shared/data) or set NANOCHAT_DATA")
    stages, actor_counts = args.stages.split(","), [int(a) for a in args.actors.split(",")]
    if args.rows_per_step % args.workers:
        raise SystemExit(f"--rows-per-step {args.rows_per_step} must be a multiple of --workers {args.workers}")
    shards = sorted((Path(args.data_root) / "pretrain_text").glob("shard_*.parquet"))[:-1]  # the last is val
    cores = os.cpu_count() or 1
    print(f"CPU: {platform.processor() or platform.machine()}, {cores} cores; load average "
          f"{os.getloadavg()[0]:.1f} (figures are only comparable on a quiet machine)")
    with tempfile.TemporaryDirectory() as temp:
        tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else Path(temp) / "tokenizer"
        if not args.tokenizer_dir:
            start = time.perf_counter()
            texts = (t for s in shards for t in pq.read_table(s, columns=["text"]).column("text").to_pylist())
            Tokenizer.train_from_iterator(texts, args.vocab_size, max_chars=args.tokenizer_chars).save(tokenizer_dir)
            print(f"tokenizer: vocab {args.vocab_size:,} on {args.tokenizer_chars:,} characters "
                  f"({time.perf_counter() - start:.0f} s)")
        seed = make_config("d20").seed
        mixtures = {}
        for stage in set(stages) & {"mid", "sft"}:
            fallbacks = Fallbacks()
            mixtures[stage] = len(training_mixture(stage, str(args.data_root), seed, fallbacks)), fallbacks.missing
        # one logical CPU per actor even where the machine has fewer cores: they share them then
        ray.init(num_cpus=max(cores, max(actor_counts)), include_dashboard=False, log_to_driver=False)
        workers = [Worker.remote(rank) for rank in range(args.workers)]
        ray.get([w.__ray_ready__.remote() for w in workers])
        print(f"{args.workers} workers, steps of {args.rows_per_step} rows of {args.seq_len + 1} tokens "
              f"(sft: conversations, cut to that); ceiling over {args.seconds:g} s; 'waited': the workers' "
              f"wait then (near 100%: the pipeline was the limit; lower: its buffer still lasted); wait @"
              f"{args.step_seconds:g}s: steady state, from the ceiling; wait @90%: measured over {args.steps} "
              f"steps of the time in (step)\n")
        print(f"{'stage':8} {'actors':>6} {'first rows':>10} {'ceiling tok/s':>14} {'per actor':>10} {'waited':>7} "
              f"{'wait @' + format(args.step_seconds, 'g') + 's':>10} {'wait @90%':>10} {'(step)':>8}")
        results = {}
        for stage in stages:
            for actors in actor_counts:
                feeder = make_feeder(stage, actors, args, shards, tokenizer_dir, mixtures)
                try:
                    r = results[stage, actors] = measure(feeder, workers, args)
                finally:
                    ray.kill(feeder)
                print(f"{stage:8} {actors:>6} {r['first_rows']:>9.1f}s {r['ceiling']:>14,.0f} "
                      f"{r['ceiling'] / actors:>10,.0f} {100 * r['ceiling_wait']:>6.0f}% {100 * r['wait_at_step']:>9.1f}% "
                      f"{100 * r['wait_at_90']:>9.1f}% {r['step_at_90']:>7.2f}s", flush=True)
        ray.shutdown()
    per_gpu = D20_TOKENS_PER_SECOND / D20_GPUS
    print(f"\nd20 on {D20_GPUS} GPUs: {D20_TOKENS_PER_SECOND:,} tokens/s, {per_gpu:,.0f} per GPU. CPU cores per "
          f"GPU for data wait < 1% (one actor per core, at {HEADROOM:.0%} of the 1-actor ceiling):")
    for stage in stages:
        one = results.get((stage, 1))
        if one is None:
            continue
        print(f"  {stage:8} {math.ceil(per_gpu / (HEADROOM * one['ceiling'])):>3} cores per GPU "
              f"({one['ceiling']:,.0f} tokens/s per core)")


if __name__ == "__main__":
    main()
