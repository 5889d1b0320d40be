"""
End-to-end pretraining benchmark on Ray: the real driver (train/pretrain.py: TorchTrainer workers
fed by the Ray Data tokenize/pack pipeline) on N workers, one run after the other in one Ray session.

    python bench/pretrain.py                        # cpu preset, 1 then 2 workers, 30 steps each
    python bench/pretrain.py --workers 2 --steps 50 --data-root ../shared/data
    python bench/pretrain.py --preset d20 --workers 8 --use-gpu --steps 50   # GPU machine: bf16 + compile

Per run it prints
  - tokens/s and MFU: medians over the steps after --warmup (the loop's own per-step figures);
    on CPU, MFU is against the fp32 matmul peak each worker measures at its thread count, on CUDA
    against the GPU kind's dense bf16 peak (common.peak_flops, nanochat_ray/gpus.py);
  - data-wait fraction: mean over steps 2..N of the time a step blocked on its rows (goal <= 1%);
  - first step: seconds from the call to pretrain() (Ray Train worker start-up, model build, the
    Ray Data pipeline start ...) to the moment step 1's metrics line appears in metrics.jsonl,
    split into "loop start" (everything before step 1 began = first step - step 1's
    step_seconds), step 1's wait for its rows (the pipeline's first row group) and its compute.
    The appearance of the line is polled every 5 ms by a driver thread, so this needs rank 0 on
    this node (it always is with a local Ray); a "time" (time.time()) field in the metrics, if the
    loop logs one, is used instead.

Every run uses one total batch (the smallest multiple of the preset's that every worker count
divides into micro-batches), so 1 and N workers train the same steps. The tokenizer is trained on
the mirror's train shards unless --tokenizer-dir is given; everything is written under a temp dir
(NANOCHAT_BASE_DIR and one artifact root per run), removed at the end unless --keep.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq
import ray
import torch

from nanochat_ray.checkpoint import checkpoint_dir
from nanochat_ray.config import PRESETS, make_config, validate
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.train.pretrain import pretrain
from nanochat_ray.stage import METRICS_LOG, RunOptions

STAGE = "base"  # pretrain()'s checkpoints and metrics.jsonl: <artifact root>/checkpoints/base/<model tag>
DATA_WAIT_GOAL = 0.01


def parse_args() -> argparse.Namespace:
    repo_root = Path(__file__).resolve().parents[1]
    default_data = os.environ.get("NANOCHAT_DATA", str(repo_root.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, one run each")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (num_iterations)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the tokens/s and MFU medians")
    parser.add_argument("--data-root", default=default_data, help="mirror laid out like shared/data (env NANOCHAT_DATA)")
    parser.add_argument("--tokenizer-dir", default=None, help="an existing tokenizer with the preset's vocab "
                                                              "(default: train one on the train shards)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker: bf16 + compile, MFU vs the GPU kind's bf16 peak")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs each worker reserves (default: 1 with GPUs; on CPU the node's CPUs / workers, "
                             "so every run uses the whole machine); Ray sets torch's threads to floor(this)")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per step for every run (default: the smallest multiple of the preset's "
                             "that every worker count divides)")
    parser.add_argument("--data-actors", type=int, default=1, help="tokenizer actors in the Ray Data pool")
    parser.add_argument("--data-actor-cpus", type=float, default=None,
                        help="CPUs each data actor reserves (default: 1 with GPUs, 0 on CPU as jobs/pretrain.py)")
    parser.add_argument("--evals", action="store_true",
                        help="keep the preset's val-bpb / CORE evals and samples (default: off, they are not timed)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray when one is started "
                                                                   "(default: os.cpu_count())")
    parser.add_argument("--verbose", action="store_true", help="show the workers' per-step lines")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tokenizer, checkpoints, metrics)")
    return parser.parse_args()


def batch_for_all(preset_total: int, micro_tokens: int, workers: list[int]) -> int:
    """Smallest multiple of the preset's total batch that micro_tokens × W divides for every W."""
    unit = math.lcm(*(micro_tokens * w for w in workers))
    return math.lcm(preset_total, unit)


def train_tokenizer(train_shards: list[Path], vocab_size: int, doc_cap: int, max_chars: int, out: Path) -> float:
    start = time.perf_counter()
    texts = (t for s in train_shards for t in pq.read_table(s, columns=["text"]).column("text").to_pylist())
    Tokenizer.train_from_iterator(texts, vocab_size, doc_cap, max_chars).save(out)
    return time.perf_counter() - start


def start_ray(args: argparse.Namespace, base: Path) -> str:
    """Join a running Ray (an initialized one, or RAY_ADDRESS), else start a local one."""
    env = {"NANOCHAT_BASE_DIR": str(base)}
    if ray.is_initialized():
        return "already initialized"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, log_to_driver=args.verbose)
        return f"connected to {os.environ['RAY_ADDRESS']}"
    # Ray Train v2's PlacementGroupCleaner asks the State API every second whether the controller
    # lives, finding the API server by auto-detection. With another Ray instance on this machine
    # (a test run, say) it can ask that one, hear "no such actor", and remove this run's placement
    # group, killing healthy workers ("A worker health check failed ... placement group was
    # removed"). This local Ray has no dashboard, so point the lookup at a closed port: the
    # cleaner then gets ServerUnavailable, which it ignores. (It only matters if the controller
    # dies, and ray.shutdown() at exit removes everything anyway.)
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:1"
    num_cpus = args.num_cpus or os.cpu_count()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=args.verbose, runtime_env={"env_vars": env})
    return f"local, num_cpus={num_cpus}"


def other_ray_instances() -> int:
    """GCS servers on this machine besides ours (one is ours): other Ray sessions sharing the cores."""
    import psutil

    count = 0
    for p in psutil.process_iter(["name"]):
        count += p.info["name"] == "gcs_server"
    return max(0, count - 1)


def contention() -> str:
    others = other_ray_instances() if ray.is_initialized() else 0
    note = f"load avg {os.getloadavg()[0]:.1f}"
    return note + (f", {others} other Ray instance(s) on this machine: figures contended" if others else "")


@ray.remote
def _threads() -> tuple[int, str | None]:
    # a Ray worker with the same CPU reservation as a train worker gets the same OMP_NUM_THREADS
    import torch as t

    return t.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


class FirstLine:
    """Polls a file from a thread; .seen is the time.time() at which it first held a line."""

    def __init__(self, path: Path, interval: float = 0.005):
        self.path, self.interval, self.seen = path, interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                if self.path.stat().st_size > 0:  # one json.dumps(...) + "\n" per write
                    self.seen = time.time()
                    return
            except FileNotFoundError:
                pass
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def summarize(lines: list[dict], warmup: int) -> dict:
    by_step = {m["step"]: m for m in lines}  # a repeated step (restart) keeps its last line
    steps = [by_step[s] for s in sorted(by_step)]
    steady = [m for m in steps if m["step"] > warmup] or steps
    after_first = [m for m in steps if m["step"] > 1] or steps
    first = by_step[min(by_step)]
    return {
        "steps": len(steps),
        "tokens_per_second": statistics.median(m["tokens_per_second"] for m in steady),
        # (MFU is missing from the first steps while the worker still probes its peak)
        "mfu": statistics.median([m["mfu"] for m in steady if "mfu" in m] or [float("nan")]),
        "step_ms": 1000 * statistics.median(m["step_seconds"] for m in steady),
        "data_wait": statistics.fmean(m["data_wait_fraction"] for m in after_first),
        "data_wait_max": max(m["data_wait_fraction"] for m in after_first),
        "worst_wait_step": max(after_first, key=lambda m: m["data_wait_fraction"])["step"],
        "step1_seconds": first["step_seconds"],
        "step1_wait": first["step_seconds"] * first["data_wait_fraction"],
        "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
    }


def bench_run(cfg, workers: int, args, shards, tokenizer_dir: Path, root: Path, cpus_per_worker: float,
              data_actor_cpus: float) -> dict:
    metrics_path = checkpoint_dir(STAGE, cfg.model_tag, root) / METRICS_LOG
    watcher = FirstLine(metrics_path)
    start = time.time()
    extra = {}
    if cfg.core_every > 0:  # --evals with a preset that runs CORE during training
        extra["core_bundle"] = Path(args.data_root).resolve() / "core_eval_bundle"
    try:
        run = RunOptions(tokenizer_dir=tokenizer_dir, num_workers=workers, use_gpu=args.use_gpu,
                         cpus_per_worker=cpus_per_worker, fresh=True, max_failures=0, artifact_root=root,
                         data_actors=args.data_actors, data_actor_cpus=data_actor_cpus)
        pretrain(cfg, run, train_shards=shards[:-1], val_shard=shards[-1], **extra)
    finally:
        total = time.time() - start
        watcher.stop()
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    result = summarize(lines, args.warmup)
    # a wall-clock "time" in the metrics (if the loop ever logs one) beats polling, and works
    # when rank 0 runs on another node; else the moment the first line appeared here
    first_seen = lines[0].get("time", watcher.seen) if lines else None
    result |= {"workers": workers, "total_seconds": total,
               "first_step": (first_seen - start) if first_seen else float("nan")}
    result["loop_start"] = result["first_step"] - result["step1_seconds"]
    return result


def main() -> None:
    args = parse_args()
    bench_start = time.perf_counter()
    temp = Path(tempfile.mkdtemp(prefix="nanochat-bench-pretrain-"))
    os.environ["NANOCHAT_BASE_DIR"] = str(temp)  # nothing lands in ~/.cache
    try:
        run_bench(args, temp, bench_start)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep:
            print(f"kept {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)
    print(f"bench wall time {time.perf_counter() - bench_start:.1f} s")


def run_bench(args: argparse.Namespace, temp: Path, bench_start: float) -> None:
    shards = sorted((Path(args.data_root).resolve() / "pretrain_text").glob("shard_*.parquet"))
    if len(shards) < 2:  # the last one is the validation shard, as in jobs/pretrain.py
        raise SystemExit(f"need at least 2 pretraining shards (train + val) under {args.data_root}, found {len(shards)}")
    base = make_config(args.preset)
    micro_tokens = base.device_batch_size * base.seq_len
    total_batch = args.total_batch_size or batch_for_all(base.total_batch_size, micro_tokens, args.workers)
    overrides = dict(num_iterations=args.steps, total_batch_size=total_batch)
    if not args.evals:
        overrides |= dict(eval_every=0, sample_every=0, core_every=-1)  # the final checkpoint is still written
    cfg = make_config(args.preset, **overrides)
    for w in args.workers:
        validate(cfg, world_size=w)  # before anything slow

    if args.tokenizer_dir:
        tokenizer_dir = Path(args.tokenizer_dir).resolve()
        vocab = Tokenizer.from_directory(tokenizer_dir).vocab_size
        if vocab != cfg.vocab_size:
            raise SystemExit(f"{tokenizer_dir} has {vocab:,} tokens, the {args.preset} preset wants {cfg.vocab_size:,}")
        print(f"tokenizer: {tokenizer_dir} (vocab {vocab:,})")
    else:
        tokenizer_dir = temp / "tokenizer"
        seconds = train_tokenizer(shards[:-1], cfg.vocab_size, cfg.tokenizer_doc_cap, cfg.tokenizer_max_chars,
                                  tokenizer_dir)
        print(f"tokenizer: vocab {cfg.vocab_size:,} trained on {len(shards) - 1} shard(s) in {seconds:.1f} s")

    t = time.perf_counter()
    how = start_ray(args, temp)
    print(f"ray: {how}, started in {time.perf_counter() - t:.1f} s")
    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    data_actor_cpus = args.data_actor_cpus if args.data_actor_cpus is not None else float(args.use_gpu)

    print(f"preset {args.preset}: depth {cfg.depth}, seq {cfg.seq_len}, vocab {cfg.vocab_size:,}, "
          f"micro-batch {cfg.device_batch_size}x{cfg.seq_len}, total batch {cfg.total_batch_size:,} tokens/step, "
          f"{cfg.num_iterations} steps, shards: {len(shards) - 1} train + 1 val")
    results = []
    for w in args.workers:
        cpus = args.cpus_per_worker or (1.0 if args.use_gpu else float(max(1, cluster_cpus // w)))
        threads, omp = ray.get(_threads.options(num_cpus=cpus).remote())
        print(f"\n--- {w} worker(s) x {cpus:g} CPU ({threads} torch threads, OMP_NUM_THREADS={omp}), "
              f"grad accum {cfg.grad_accum_steps(w)}, data actors {args.data_actors} x {data_actor_cpus:g} CPU; "
              f"{contention()}", flush=True)
        r = bench_run(cfg, w, args, shards, tokenizer_dir, temp / f"run-{w}w", cpus, data_actor_cpus)
        r |= {"cpus": cpus, "threads": threads}
        results.append(r)
        print(f"{r['steps']} steps in {r['total_seconds']:.1f} s | {r['tokens_per_second']:,.0f} tok/s | "
              f"mfu {100 * r['mfu']:.1f}% | step {r['step_ms']:.0f} ms | data wait {100 * r['data_wait']:.2f}% "
              f"(max {100 * r['data_wait_max']:.1f}% at step {r['worst_wait_step']}) | first step {r['first_step']:.1f} s "
              f"= loop start {r['loop_start']:.1f} + rows {r['step1_wait']:.1f} "
              f"+ compute {r['step1_seconds'] - r['step1_wait']:.1f} | loss {r['loss_first']:.2f} -> {r['loss_last']:.2f} "
              f"| after: {contention()}", flush=True)

    device = (torch.cuda.get_device_name() if args.use_gpu and torch.cuda.is_available() else
              f"{os.cpu_count()} CPU cores (Ray: {cluster_cpus} CPUs), torch {torch.__version__}")
    peak = "the GPU kind's dense bf16 peak (nanochat_ray/gpus.py)" if args.use_gpu else "each worker's measured fp32 matmul peak x workers"
    print(f"\npretraining, preset {args.preset} ({cfg.num_iterations} steps, {cfg.total_batch_size:,} tokens/step) "
          f"on {device}")
    print(f"tok/s and MFU: medians over steps {args.warmup + 1}..{cfg.num_iterations}; MFU vs {peak}; "
          f"data wait: mean over steps 2..{cfg.num_iterations} (goal <= {100 * DATA_WAIT_GOAL:.0f}%); "
          f"first step: seconds from the pretrain() call to step 1's metrics")
    header = (f"{'workers':>7} {'cpu/w':>5} {'thr/w':>5} {'tok/s':>8} {'MFU':>6} {'step ms':>8} {'data wait':>9} "
              f"{'first step s':>12} {'(loop start':>11} {'rows':>6} {'compute)':>8} {'total s':>8}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        flag = "" if r["data_wait"] <= DATA_WAIT_GOAL else " !"
        print(f"{r['workers']:>7} {r['cpus']:>5g} {r['threads']:>5} {r['tokens_per_second']:>8,.0f} "
              f"{100 * r['mfu']:>5.1f}% {r['step_ms']:>8.0f} {100 * r['data_wait']:>8.2f}%{flag:<2}"
              f"{r['first_step']:>11.1f} {r['loop_start']:>11.1f} {r['step1_wait']:>6.1f} "
              f"{r['step1_seconds'] - r['step1_wait']:>8.1f} {r['total_seconds']:>8.1f}")


if __name__ == "__main__":
    main()
