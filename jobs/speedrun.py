"""
The whole speedrun as one resumable job (SPEC §0, §12): shard downloads under tokenizer training →
pretraining → base eval → midtraining → chat eval → SFT → chat eval → RL (--rl) → chat eval →
report.md in the artifact root.

    python jobs/speedrun.py                                   # cpu preset on a local Ray
    python jobs/speedrun.py --preset d20 --num-workers 8 --use-gpu --num-actors 8 --hourly-price 24
    ray job submit --working-dir . -- python jobs/speedrun.py --preset d20 --num-workers 8 --use-gpu
    python jobs/speedrun.py --from midtrain                   # midtraining and every stage after it again
    python jobs/speedrun.py --only base_eval --stage-args "base_eval=--max-per-task 100"

Each finished stage leaves a record, <base dir>/speedrun/<stage>.json, holding a fingerprint of
its command line and of the runs it read (a fresh run id per run). Submitting again skips every
stage whose record matches and whose outputs still exist, re-runs a stage whose config or inputs
changed (and so everything that reads it), and resumes an interrupted training stage from its
last checkpoint. Evaluations of a saved checkpoint run beside the next training stage (--overlap).
"""

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import shlex
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from nanochat_ray.checkpoint import PREVIOUS, TRAIN_JOBS, checkpoint_dir, latest_step, step_name
from nanochat_ray.common import add_verbose_flag, base_dir, eval_results_path, format_seconds, init_ray, read_json, write_atomic
from nanochat_ray.config import (EVAL_SIZES, Config, ConfigError, add_config_args, config_from_args, default_preset,
                                 make_config)
from nanochat_ray.gpus import GPU_KINDS, GPUKind, gpu_kind, kind_of_device
from nanochat_ray.plan import format_plan, make_plan, refusal
from nanochat_ray.report import RECORDS_DIR, write_report


@dataclass(frozen=True)
class Stage:
    name: str
    job: str  # the module under jobs/ that runs it
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: their run ids are part of its fingerprint
    checkpoint: str | None = None  # training stages: the checkpoint stage they write (resumable)
    evaluates: str | None = None  # chat evals: the checkpoint stage they read


# the tokenizer, then each checkpoint stage of the graph (checkpoint.STAGES) trained by its job and
# evaluated: tokenizer, pretrain, base_eval, midtrain, mid_eval, sft, sft_eval, rl, rl_eval
STAGES = (Stage("tokenizer", "tokenizer"), *(
    stage
    for checkpoint, job in TRAIN_JOBS.items()
    for stage in (Stage(job, job, (TRAIN_JOBS[PREVIOUS[checkpoint]] if checkpoint in PREVIOUS else "tokenizer",),
                        checkpoint=checkpoint),
                  Stage("base_eval", "base_eval", (job,)) if checkpoint == "base"
                  else Stage(f"{checkpoint}_eval", "chat_eval", (job,), evaluates=checkpoint))))
BY_NAME = {stage.name: stage for stage in STAGES}
RL_STAGES = ("rl", "rl_eval")
MAX_CPU_ACTORS = 8  # each evaluation actor holds a copy of the model


# -----------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [stage.name for stage in STAGES]
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--from", dest="start", choices=names, default=None,
                       help="run this stage and every later one again (earlier ones only if not done)")
    order.add_argument("--only", choices=names + ["report"], default=None,
                       help="run just this stage again (the ones it reads must be done), then the report")
    parser.add_argument("--force", action="store_true", help="run every stage again, from scratch")
    parser.add_argument("--rl", action="store_true", help="include RL and its chat eval (off, as in the reference)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate a saved checkpoint beside the next training stage (default on)")
    parser.add_argument("--stage-args", action="append", default=[], metavar="STAGE=FLAGS",
                        help='extra flags for one stage, e.g. "pretrain=--num-iterations 20 --save-every 5"')
    parser.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs reserved by each training worker (default: on CPUs, the cluster's CPUs over the "
                             "workers, half of them while an evaluation runs beside; with GPUs 1)")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="evaluation actors, 1 CPU or 1 GPU each (default: on CPUs, one per cluster CPU up to "
                             f"{MAX_CPU_ACTORS}, half as many beside training; with GPUs 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per training worker and eval actor")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA"),
                        help="local mirror laid out like shared/data (env NANOCHAT_DATA)")
    parser.add_argument("--hourly-price", type=float, default=None,
                        help="price of the cluster per hour, for the report's cost estimate")
    parser.add_argument("--plan", action="store_true", help="print the memory and time plan (jobs/plan.py) and exit")
    parser.add_argument("--gpu", choices=list(GPU_KINDS), default=None,
                        help="GPU kind for the plan (default: what the cluster reports, else h100-80gb)")
    parser.add_argument("--ignore-plan", action="store_true",
                        help="start a GPU run even when the plan says a stage does not fit")
    add_config_args(parser)
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    args.preset = args.preset or default_preset()  # decided (and said) once
    try:
        args.cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    args.data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    args.extra = {}
    for item in args.stage_args:
        name, sep, flags = item.partition("=")
        if not sep or name not in BY_NAME:
            parser.error(f"--stage-args takes STAGE=FLAGS with STAGE one of {', '.join(names)}; got {item!r}")
        args.extra[name] = args.extra.get(name, []) + shlex.split(flags)
    wanted = {args.start, args.only} | set(args.extra)
    if not args.rl and wanted & set(RL_STAGES):
        parser.error("the RL stages run only with --rl")
    if args.rl and not (REPO / "jobs" / "rl.py").is_file():
        parser.error(f"--rl needs the RL stage, jobs/rl.py, which {REPO} lacks: update the checkout, "
                     f"or run without --rl")
    return args


def config_flags(cfg: Config, preset: str) -> list[str]:
    """The flags that give `cfg` from `preset`: the speedrun's overrides, handed to every stage."""
    base = make_config(preset)
    return [item for f in dataclasses.fields(Config) if getattr(cfg, f.name) != getattr(base, f.name)
            for item in (f"--{f.name.replace('_', '-')}", str(getattr(cfg, f.name)))]


def stage_argv(stage: Stage, args: argparse.Namespace) -> list[str]:
    """What defines the stage's result: its command line without --resume / --fresh and without the
    CPUs and actors it runs on (resource_flags), which change its speed, not its numbers."""
    argv = ["--preset", args.preset, *config_flags(args.cfg, args.preset)]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    gpu = ["--use-gpu"] if args.use_gpu else []
    if stage.checkpoint:
        # the RL learner is one actor; its rollout actors come from --stage-args "rl=--num-rollout-actors N"
        argv += ["--num-workers", str(1 if stage.name == "rl" else args.num_workers), *gpu]
    elif stage.job != "tokenizer":
        argv += gpu
    if stage.evaluates:
        argv += ["--stage", stage.evaluates]
    if stage.job in ("base_eval", "chat_eval"):  # the preset's evaluation sizes (a --stage-args flag overrides them)
        sizes = EVAL_SIZES.get(args.preset, {}).get("base" if stage.job == "base_eval" else "chat", {})
        argv += [item for name, value in sizes.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    return argv + args.extra.get(stage.name, [])


def resource_flags(stage: Stage, args: argparse.Namespace, cluster_cpus: int, beside: bool) -> list[str]:
    """CPUs for a training stage's workers, or eval actors: a CPU-only stage gets every CPU of the
    cluster, or half of them when a training stage and an evaluation run side by side."""
    share = max(1, cluster_cpus // 2) if beside else max(1, cluster_cpus)
    if stage.checkpoint:
        # RL: half for the learner, half for the rollout actor(s), each of which reserves its own CPU
        workers = 2 if stage.name == "rl" else args.num_workers
        cpus = args.cpus_per_worker or (1.0 if args.use_gpu else float(max(1, share // workers)))
        return ["--cpus-per-worker", str(cpus)]
    if stage.job == "tokenizer":
        return []  # the Rust trainer uses every core of the driver's machine
    return ["--num-actors", str(args.num_actors or (1 if args.use_gpu else min(share, MAX_CPU_ACTORS)))]


# -----------------------------------------------------------------------------
# stage records


def records_dir() -> Path:
    path = base_dir() / RECORDS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def outputs_of(stage: Stage, cfg: Config) -> list[str]:
    """What a finished stage leaves behind, relative to the artifact root."""
    tag = cfg.model_tag
    if stage.job == "tokenizer":
        return ["tokenizer/tokenizer.json"]
    if stage.checkpoint:
        directory = checkpoint_dir(stage.checkpoint, tag)
        step = latest_step(directory)
        return [str((directory / step_name(step)).relative_to(base_dir()))] if step is not None else []
    if stage.job == "base_eval":
        return [str(eval_results_path("base", tag, ".")), f"evals/core_{tag}.csv"]
    return [str(eval_results_path(stage.evaluates, tag, "."))]


def headline(stage: Stage, result: dict, cfg: Config) -> tuple[str, float | None]:
    """The one number printed for a stage."""
    if stage.job == "tokenizer":
        return "val bytes/token", result["compression"]["val"]
    if stage.job == "base_eval":
        return "CORE", result["core"]
    if stage.evaluates:
        return "ChatCORE", result["chatcore"]
    # a resumed run that had already finished reports nothing new: then the checkpoint's metrics
    metrics = result.get("metrics") or final_metrics(stage, cfg)
    for name in ("val_bpb", "pass_at_1", "mean_reward", "loss_ema", "loss"):
        if name in metrics:
            return name, metrics[name]
    return "metrics", None


def final_metrics(stage: Stage, cfg: Config) -> dict:
    directory = checkpoint_dir(stage.checkpoint, cfg.model_tag)
    step = latest_step(directory)
    return read_json(directory / step_name(step) / "meta.json").get("metrics", {}) if step is not None else {}


# -----------------------------------------------------------------------------
# running


def run_job(stage: Stage, argv: list[str]) -> dict:
    """The stage's job, in this driver: it joins the Ray cluster we are on."""
    return importlib.import_module(f"jobs.{stage.job}").main(argv)


class Speedrun:
    def __init__(self, args: argparse.Namespace, cluster_cpus: int):
        self.args = args
        self.cluster_cpus = cluster_cpus
        self.records = records_dir()
        self.stages = [s for s in STAGES if args.rl or s.name not in RL_STAGES]
        self.background = ThreadPoolExecutor(max_workers=len(STAGES), thread_name_prefix="eval")
        self.pending: dict[str, Future] = {}  # evaluations running beside the main line
        self.launched_beside = False  # the stage just before was an evaluation sent to the background
        self.summary: list[dict] = []

    def forced(self, stage: Stage) -> bool:
        args = self.args
        names = [s.name for s in self.stages]
        if args.only:
            return stage.name == args.only
        return args.force or (args.start is not None and names.index(stage.name) >= names.index(args.start))

    def selected(self, stage: Stage) -> bool:
        return self.args.only in (None, stage.name)

    def record(self, stage: Stage) -> dict | None:
        return read_json(self.records / f"{stage.name}.json", default=None)

    def inputs(self, stage: Stage) -> dict:
        needs = {}
        for name in stage.needs:
            upstream = self.record(BY_NAME[name])
            if upstream is None:
                raise ConfigError(f"{stage.name} needs a finished {name}, which has no record in {self.records}: "
                                  f"run the speedrun without --only/--from first")
            needs[name] = upstream["run_id"]
        return {"stage": stage.name, "argv": stage_argv(stage, self.args), "needs": needs}

    def run(self) -> float:
        start = time.time()
        for stage in self.stages:
            if not self.selected(stage):
                continue
            self.wait([name for name in stage.needs if name in self.pending])
            self.step(stage)
        self.wait()
        self.background.shutdown()
        wall = time.time() - start
        self.print_summary(wall)
        return wall

    def step(self, stage: Stage) -> None:
        inputs = self.inputs(stage)
        fp = fingerprint(inputs)
        done = self.record(stage)
        if (done and done["fingerprint"] == fp and not self.forced(stage)
                and all((base_dir() / p).exists() for p in done["outputs"])):
            self.launched_beside = False
            print(f"[speedrun] {stage.name:<10} done before ({format_seconds(done['seconds'])}, "
                  f"{format_headline(done['headline'])}): skipped", flush=True)
            self.summary.append({"stage": stage.name, "status": "skipped", **done})
            return
        later = [s for s in self.stages[self.stages.index(stage) + 1:] if self.selected(s)]
        background = self.args.overlap and not stage.checkpoint and stage.job != "tokenizer" and bool(later)
        # Several evaluations may run at once; Ray queues whatever does not fit the cluster, so a
        # training stage starts as soon as CPUs free up rather than after every evaluation ended.
        beside = background or (stage.checkpoint is not None and self.launched_beside)
        self.launched_beside = background
        argv = (inputs["argv"] + resource_flags(stage, self.args, self.cluster_cpus, beside)
                + self.resume_flags(stage, fp))
        started_file = self.records / f"{stage.name}.started.json"
        write_atomic(started_file, json.dumps({"fingerprint": fp, "started_at": time.time()}, indent=2))
        (self.records / f"{stage.name}.json").unlink(missing_ok=True)  # what reads it must run again

        def work() -> dict:
            print(f"[speedrun] {stage.name:<10} starting: {stage.job} {shlex.join(argv)}", flush=True)
            began = time.time()
            result = run_job(stage, argv)
            finished = time.time()
            record = {"stage": stage.name, "fingerprint": fp, "inputs": inputs, "run_id": uuid.uuid4().hex,
                      "started_at": began, "finished_at": finished, "seconds": finished - began,
                      "resumed": "--resume" in argv, "job": f"jobs/{stage.job}.py", "argv": argv,
                      "headline": headline(stage, result, self.args.cfg), "result": result,
                      "outputs": outputs_of(stage, self.args.cfg)}
            write_atomic(self.records / f"{stage.name}.json", json.dumps(record, indent=2, default=str))
            started_file.unlink(missing_ok=True)
            print(f"[speedrun] {stage.name:<10} {'resumed and done' if record['resumed'] else 'done'} in "
                  f"{format_seconds(record['seconds'])}: {format_headline(record['headline'])}", flush=True)
            self.summary.append({"status": "resumed" if record["resumed"] else "ran", **record})
            return record

        if background:
            self.pending[stage.name] = self.background.submit(work)
        else:
            work()

    def resume_flags(self, stage: Stage, fp: str) -> list[str]:
        """A training stage that was interrupted with the same fingerprint resumes; any other
        leftover run of it is moved aside."""
        if not stage.checkpoint or latest_step(checkpoint_dir(stage.checkpoint, self.args.cfg.model_tag)) is None:
            return []
        started = read_json(self.records / f"{stage.name}.started.json", default={})
        if started.get("fingerprint") == fp and not self.forced(stage):
            return ["--resume"]
        return ["--fresh"]

    def wait(self, names: list[str] | None = None) -> None:
        """Until the given background stages (default: all) finished; re-raises their errors."""
        for name in list(self.pending) if names is None else names:
            try:
                self.pending.pop(name).result()
            except BaseException as e:
                raise RuntimeError(f"the {name} stage (run beside training) failed: {e}") from e

    def print_summary(self, wall: float) -> None:
        total = sum(row["seconds"] for row in self.summary if row["status"] != "skipped")
        print("\n[speedrun] stage        status     time      headline")
        for row in sorted(self.summary, key=lambda r: [s.name for s in STAGES].index(r["stage"])):
            print(f"[speedrun] {row['stage']:<12} {row['status']:<9} {format_seconds(row['seconds']):>8}  "
                  f"{format_headline(row['headline'])}")
        print(f"[speedrun] wall time {format_seconds(wall)}; stage time run now {format_seconds(total)} "
              f"(overlap won {format_seconds(max(0.0, total - wall))})", flush=True)


def format_headline(item: list | tuple) -> str:
    name, value = item
    return f"{name} {value:.4f}" if isinstance(value, (int, float)) else f"{name} -"


def cluster_resources() -> dict:
    import ray
    return {key: value for key, value in sorted(ray.cluster_resources().items())
            if not key.startswith(("node:", "memory", "object_store_memory"))} | {
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "memory_gb": round(ray.cluster_resources().get("memory", 0) / 2**30, 1)}


def cluster_gpu_kind() -> GPUKind | None:
    """The GPU kind Ray reports for the cluster (resource accelerator_type:KIND), or this machine's."""
    import ray
    import torch
    names = [key.split(":", 1)[1] for key in ray.cluster_resources() if key.startswith("accelerator_type:")]
    names += [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else []
    kinds = [kind for kind in map(kind_of_device, names) if kind is not None]
    return kinds[0] if kinds else None


def check_plan(args: argparse.Namespace, kind: GPUKind | None) -> None:
    """Print the plan; refuse a GPU run that would not fit unless --ignore-plan."""
    plan = make_plan(args.cfg, kind or gpu_kind("h100-80gb"), args.num_workers, hourly_price=args.hourly_price)
    note = "" if kind or args.gpu else " (GPU kind not reported by the cluster: assumed; pass --gpu)"
    print(format_plan(plan) + note, flush=True)
    problem = refusal(plan)
    if problem and not args.ignore_plan:
        sys.exit(f"speedrun: {problem}. Nothing was started; pass --ignore-plan to run anyway.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plan:
        check_plan(args, gpu_kind(args.gpu) if args.gpu else None)
        return {}
    init_ray()
    if args.use_gpu:
        check_plan(args, gpu_kind(args.gpu) if args.gpu else cluster_gpu_kind())
    start = time.time()
    import ray
    run = Speedrun(args, int(ray.cluster_resources().get("CPU", 1)))
    try:
        wall = 0.0 if args.only == "report" else run.run()
    except ConfigError as e:  # e.g. --only a stage whose inputs were never made
        sys.exit(f"speedrun: {e}")
    info = {"started_at": start, "wall_seconds": wall, "preset": args.preset, "argv": sys.argv[1:] if argv is None else argv,
            "model_tag": args.cfg.model_tag, "cluster_resources": cluster_resources(),
            "hourly_price": args.hourly_price, "stages": [s.name for s in run.stages], "summary": run.summary}
    report = write_report(base_dir(), info, REPO)
    print(f"[speedrun] report: {report}", flush=True)
    return {"report": str(report), "wall_seconds": wall, "summary": run.summary}


if __name__ == "__main__":
    main()
