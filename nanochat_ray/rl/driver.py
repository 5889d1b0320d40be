"""
The RL driver (SPEC §10): one learner actor, a pool of rollout actors, on-policy steps.

    rl_train(cfg, RLOptions(), RunOptions(tokenizer_dir=...))     # python jobs/rl.py

Each step:
  1. the learner's weights are published once (one ray.put per version) and loaded by every
     rollout actor;
  2. the step's questions are dealt to the actors in calls of a few questions each; every call
     samples num_samples completions per question (temperature 1, top-k 50, tool use on) and
     scores them where it samples;
  3. each call's result goes straight from its actor to the learner, which turns it into
     gradient as soon as it lands, while later calls are still sampling (overlap 1, below);
  4. the learner divides by the step's valid tokens, steps the optimizers, and the loop goes on.
Every cfg.eval_every steps the actors measure pass@k (k = 1..eval_samples) on held-out
questions; every cfg.save_every steps the learner checkpoints stage `rl` while the actors
already sample the next step (overlap 2).

Overlaps, and why they keep SPEC §10's on-policy semantics:
  1. learner ← rollouts: a call's gradient depends only on its own groups (advantages are per
     question, and so is the loss normalisation) and on weights that do not change until step();
     dividing by the step's number of questions at the end averages them. Calls are accumulated
     in submission order, so the sum is the same whichever actor finishes first.
  2. checkpoint ← next rollouts: the checkpoint holds the weights already published.
Not overlapped: sampling step s+1 before update s lands would be off-policy (stale weights), so
actors refuse it (StaleWeightsError) and the learner rejects rollouts of an old version.
"""

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import ray

from nanochat_ray.common import TRAINING_ENV, dashboard_gauges, init_ray
from nanochat_ray.config import Config, ConfigError
from nanochat_ray.data.registry import mirror_root
from nanochat_ray.rl.actors import LearnerActor, RolloutActor, RolloutResult
from nanochat_ray.rl.policy import default_questions_per_call, pass_at_k
from nanochat_ray.rl.tasks import load_reward_task
from nanochat_ray.stage import RL_GAUGES, MetricRecorder, RunOptions, check_stage, previous_checkpoint

EVAL_SEED_OFFSET = 1_000_000_007  # eval samples are seeded apart from training samples
EVAL_QUESTIONS_PER_CALL = 16  # bounds an eval call's KV cache (16 questions × eval_samples rows)


@dataclass(frozen=True)
class RLOptions:
    task: str = "gsm8k"  # gsm8k | toy (plumbing check: "answer with the number 7")
    questions_per_step: int = 16  # SPEC §10
    samples_per_question: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    eval_questions: int = 400  # held-out test questions for pass@k
    eval_samples: int = 8  # pass@k for k = 1..eval_samples
    num_rollout_actors: int = 0  # 0 = one per GPU the learner leaves free (1 without GPUs)
    questions_per_call: int = 0  # questions per rollout call; 0 = half an actor's share (so results stream)
    placement: str = "separate"  # separate: learner and rollout actors one GPU each; colocated: half each
    cpus_per_actor: float = 1.0
    call_timeout_s: float = 3600.0  # the longest any one actor call may take (a pass@k eval is the longest)


def check_options(options: RLOptions) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)
    for name in ("questions_per_step", "samples_per_question", "max_new_tokens"):
        check(getattr(options, name) > 0, f"{name} must be positive, got {getattr(options, name)}")
    check(options.num_rollout_actors >= 0, f"num_rollout_actors must be >= 0 (0 = one per free GPU), "
                                           f"got {options.num_rollout_actors}")
    check(options.questions_per_call >= 0, f"questions_per_call must be >= 0, got {options.questions_per_call}")
    check(options.temperature > 0, f"temperature must be > 0 for RL sampling, got {options.temperature}")
    check(options.eval_samples >= 1, f"eval_samples must be >= 1 (pass@1..k), got {options.eval_samples}")
    check(options.placement in ("separate", "colocated"), f"placement must be separate or colocated, "
                                                          f"got {options.placement!r}")
    check(options.call_timeout_s > 0, f"call_timeout_s must be > 0, got {options.call_timeout_s}")


class ActorTimeoutError(RuntimeError):
    """An actor call took longer than call_timeout_s: the actor is hung, or the limit is too low."""


def wait_for(refs, timeout: float, what: str):
    """ray.get with a deadline: a hung actor becomes a clear error (and a restart), not a hang."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ActorTimeoutError(f"{what} took longer than {timeout:g} s: an actor is hung or waits for resources "
                                f"the cluster lacks; if it is only slow, raise --call-timeout-s") from None


# what ends an attempt and restarts every actor from the last rl checkpoint: an actor that died,
# an exception raised in the learner or a rollout actor, a call that hung
RESTARTABLE = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ActorTimeoutError)


# -----------------------------------------------------------------------------


def deal(indices: list[int], seeds: list[int], num_actors: int, per_call: int) -> list[tuple[int, list, list]]:
    """(actor, indices, seeds) calls: each actor a balanced contiguous share, cut into calls of at most
    per_call questions, listed round by round (every actor's first call, then the second...), which
    is the order they finish in and so the order the learner can take them without waiting."""
    base, extra = divmod(len(indices), num_actors)
    bounds = [a * base + min(a, extra) for a in range(num_actors + 1)]
    calls = [[list(range(lo, hi))[i:i + per_call] for i in range(0, hi - lo, per_call)]
             for lo, hi in zip(bounds, bounds[1:])]
    return [(a, [indices[i] for i in c[r]], [seeds[i] for i in c[r]])
            for r in range(max(len(c) for c in calls)) for a, c in enumerate(calls) if r < len(c)]


class Rollouts:
    """The rollout actors, the weight version they hold, and how questions are dealt to them."""

    def __init__(self, actors: list, options: RLOptions):
        self.actors, self.options, self.version = actors, options, None

    def load(self, version: int, weights_ref) -> None:
        wait_for([actor.load_weights.remote(version, weights_ref) for actor in self.actors],
                 self.options.call_timeout_s, f"loading weights v{version} into the rollout actors")
        self.version = version

    def submit(self, task: str, split: str, indices: list[int], seeds: list[int], num_samples: int,
               per_call: int) -> list:
        o = self.options
        return [self.actors[a].rollout.remote(self.version, task, split, idx, sd, num_samples, o.max_new_tokens,
                                              o.temperature, o.top_k)
                for a, idx, sd in deal(indices, seeds, len(self.actors), per_call)]

    def pass_at_k(self, split: str, num_questions: int) -> dict:
        """pass@k, k = 1..eval_samples, on the first num_questions of the split (fixed seeds)."""
        n = self.options.eval_samples
        indices = list(range(num_questions))
        seeds = [EVAL_SEED_OFFSET + i * n for i in indices]
        per_call = min(EVAL_QUESTIONS_PER_CALL, max(1, math.ceil(num_questions / len(self.actors))))
        results: list[RolloutResult] = wait_for(self.submit(self.options.task, split, indices, seeds, n, per_call),
                                                self.options.call_timeout_s, f"pass@k on {num_questions} questions")
        correct = [sum(r >= 1.0 for r in g.rewards) for result in results for g in result.groups]
        return {f"pass_at_{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in range(1, n + 1)}


def question_order(num_examples: int, seed: int, step: int, per_step: int) -> list[int]:
    """Step s's questions: positions [s·Q, (s+1)·Q) of a seeded shuffle, reshuffled every epoch."""
    positions = [divmod(p, num_examples) for p in range(step * per_step, (step + 1) * per_step)]
    orders = {e: np.random.default_rng(seed + e).permutation(num_examples) for e in {e for e, _ in positions}}
    return [int(orders[e][i]) for e, i in positions]


def rl_train(cfg: Config, options: RLOptions, run: RunOptions, fail_in: str = "rollout") -> dict:
    """Train stage `rl` from the latest `sft` checkpoint; returns the last metrics and checkpoint path.

    When an actor dies (a lost node, an out-of-memory kill), the learner or a rollout actor raises,
    or a call outlives options.call_timeout_s, every actor is restarted and the run resumes from
    the last rl checkpoint, up to run.max_failures times (FailureConfig's behaviour for the
    TorchTrainer stages). run.fail_at_step (tests) fails once at that step: fail_in "rollout" kills
    a rollout actor after it, "learner" makes the learner's update raise. The learner is one actor
    (run.num_workers must be 1) with run.cpus_per_worker CPUs.
    """
    check_options(options)
    stage_dir = check_stage(cfg, "rl", run)
    start_from = previous_checkpoint("rl", cfg, run.artifact_root)
    use_gpu, cpus_per_worker, max_failures = run.use_gpu, run.cpus_per_worker, run.max_failures
    mirror = mirror_root(run.data_root)  # resolved here: actors see neither relative paths nor our environment
    mirror = str(mirror) if mirror else None
    train_task = load_reward_task(options.task, "train", mirror)  # missing data fails here, before Ray
    eval_questions = min(options.eval_questions, len(load_reward_task(options.task, "test", mirror)))
    Q, S = options.questions_per_step, options.samples_per_question
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else max(1, len(train_task) // Q)

    init_ray()
    options = replace(options, num_rollout_actors=rollout_actors(options, use_gpu))
    per_call = options.questions_per_call or default_questions_per_call(Q, options.num_rollout_actors)
    gpus = {"num_gpus": 0.5 if options.placement == "colocated" else 1} if use_gpu else {}
    warn_if_short(options.num_rollout_actors + 1, cpus_per_worker + options.num_rollout_actors * options.cpus_per_actor,
                  gpus.get("num_gpus", 0))
    history: list[dict] = []  # every attempt's steps (a step redone after a failure appears twice)
    for attempt in range(max_failures + 1):
        launched = time.perf_counter()
        fail = run.fail_at_step if attempt == 0 else None
        learner = LearnerActor.options(num_cpus=cpus_per_worker, runtime_env={"env_vars": TRAINING_ENV},
                                       **gpus).remote(
            cfg, str(stage_dir), str(start_from), run.resume or attempt > 0, {"rl": asdict(options)},
            fail_at_step=fail if fail_in == "learner" else None)
        actors = [RolloutActor.options(num_cpus=options.cpus_per_actor, **gpus).remote(cfg, str(run.tokenizer_dir), mirror)
                  for _ in range(options.num_rollout_actors)]
        try:
            started = wait_for(learner.describe.remote(), options.call_timeout_s, "starting the learner")
            print(f"rl: {options.task}, {Q} questions x {S} samples per step, steps {started['step']}.."
                  f"{num_iterations}, {len(actors)} rollout actor(s), starting from {started['started_from']} "
                  f"(actors up in {time.perf_counter() - launched:.1f}s)", flush=True)
            steps = RLRun(cfg, options, stage_dir, learner, Rollouts(actors, options), num_iterations, len(train_task),
                          eval_questions, per_call, history)
            return steps.train(started["step"], fail if fail_in == "rollout" else None)
        except RESTARTABLE as e:
            if attempt == max_failures:
                raise
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            print(f"attempt {attempt + 1} failed ({type(cause).__name__}: {str(cause).splitlines()[0][:300]}); "
                  f"restarting every actor from the last rl checkpoint (failure {attempt + 1} of at most "
                  f"{max_failures})", flush=True)
        finally:
            for actor in [learner, *actors]:
                ray.kill(actor)
    raise AssertionError("unreachable: the last attempt returns or raises")


def rollout_actors(options: RLOptions, use_gpu: bool) -> int:
    """The number asked for, else one per GPU of the cluster that the learner leaves free (colocated:
    one per GPU, one of them sharing the learner's), else 1 without GPUs; says which and why."""
    if options.num_rollout_actors > 0:
        return options.num_rollout_actors
    gpus = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 0
    count = max(1, gpus if options.placement == "colocated" else gpus - 1)
    reason = (f"the cluster's {gpus} GPUs, {options.placement} from the learner" if use_gpu
              else "no --use-gpu")
    print(f"rl: {count} rollout actor(s) ({reason}; --num-rollout-actors overrides)", flush=True)
    return count


def warn_if_short(num_actors: int, cpus: float, gpus_each: float) -> None:
    """Actors wait silently for resources the cluster lacks: say so (an autoscaler may still add them)."""
    have = ray.cluster_resources()
    for name, need in (("CPU", cpus), ("GPU", gpus_each * num_actors)):
        if need > have.get(name, 0):
            print(f"warning: the learner and rollout actors need {need:g} {name}s, the cluster has "
                  f"{have.get(name, 0):g} now: they will wait for more (with --use-gpu, try --placement colocated "
                  f"or fewer --num-rollout-actors)", flush=True)


class RLRun:
    """The step loop of one run: publish, roll out, learn, evaluate, checkpoint, record."""

    def __init__(self, cfg: Config, options: RLOptions, stage_dir: Path, learner, rollouts: Rollouts,
                 num_iterations: int, num_train: int, eval_questions: int, per_call: int, history: list[dict]):
        self.cfg, self.options, self.stage_dir = cfg, options, stage_dir
        self.learner, self.rollouts = learner, rollouts
        self.num_iterations, self.num_train = num_iterations, num_train
        self.eval_questions, self.per_call = eval_questions, per_call
        self.recorder = MetricRecorder(cfg, "rl", stage_dir, dashboard_gauges("rl", RL_GAUGES))
        self.history = history
        self.timeout = options.call_timeout_s

    def publish(self) -> None:
        version, [weights] = wait_for(self.learner.publish.remote(), self.timeout, "publishing the weights")
        self.rollouts.load(version, weights)

    def record(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.recorder.record(metrics)

    def step(self, step: int) -> dict:
        """One on-policy step: rollouts of the published weights stream into the learner, which updates."""
        Q, S = self.options.questions_per_step, self.options.samples_per_question
        start = time.perf_counter()
        indices = question_order(self.num_train, self.cfg.seed, step, Q)
        seeds = [self.cfg.seed + (step * Q + j) * S for j in range(Q)]  # reproducible, whichever actor samples
        refs = self.rollouts.submit(self.options.task, "train", indices, seeds, S, self.per_call)
        # in submission order: the gradient sum does not depend on who finishes first
        accumulated = [self.learner.accumulate.remote(ref) for ref in refs]
        stats = self.learner.step.remote(self.num_iterations)
        results: list[RolloutResult] = wait_for(refs, self.timeout, f"step {step + 1}'s rollouts")
        rollout_seconds = time.perf_counter() - start
        # the accumulate calls too: a learner that raised on a rollout must not update without it
        learner_metrics = wait_for([*accumulated, stats], self.timeout, f"step {step + 1}'s update")[-1]
        step_seconds = time.perf_counter() - start
        self.publish()

        rewards = [r for result in results for g in result.groups for r in g.rewards]
        lengths = [len(t) for result in results for g in result.groups for t in g.tokens]
        idle = len(self.rollouts.actors) * step_seconds - sum(result.seconds for result in results)
        return {
            "step": step + 1, "mean_reward": float(np.mean(rewards)), "mean_sequence_length": float(np.mean(lengths)),
            "rollout_tokens_per_second": sum(lengths) / rollout_seconds, "rollout_seconds": rollout_seconds,
            "rollout_idle_seconds": idle, "rollout_idle_fraction": idle / (len(self.rollouts.actors) * step_seconds),
            "step_seconds": step_seconds,
        } | learner_metrics

    def train(self, first_step: int, fail_at_step: int | None = None) -> dict:
        cfg, k = self.cfg, self.options.eval_samples
        self.publish()
        if first_step == 0 and cfg.eval_every > 0:  # where the policy starts
            metrics = {"step": 0} | self.rollouts.pass_at_k("test", self.eval_questions)
            print(f"step 00000 | pass@1 {metrics['pass_at_1']:.4f} | pass@{k} {metrics[f'pass_at_{k}']:.4f}", flush=True)
            self.record(metrics)
        saving, checkpoint, run_start = None, None, time.perf_counter()
        for step in range(first_step, self.num_iterations):
            metrics = self.step(step)
            last = step + 1 == self.num_iterations
            if cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last):
                metrics |= self.rollouts.pass_at_k("test", self.eval_questions)
            if saving is not None:
                checkpoint, saving = wait_for(saving, self.timeout, "saving a checkpoint"), None
            if last or (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0):
                saving = self.learner.save.remote(metrics)  # written while the next step samples
            eta = (self.num_iterations - step - 1) * (time.perf_counter() - run_start) / (step + 1 - first_step)
            print(f"step {step + 1:05d}/{self.num_iterations} | reward {metrics['mean_reward']:.3f} | "
                  f"len {metrics['mean_sequence_length']:.0f} | {metrics['rollout_tokens_per_second']:,.0f} tok/s | "
                  f"learner {metrics['learner_seconds'] * 1000:.0f} ms | "
                  f"idle {100 * metrics['rollout_idle_fraction']:.0f}% | eta {eta / 60:.1f} min"
                  + (f" | pass@1 {metrics['pass_at_1']:.3f} pass@{k} {metrics[f'pass_at_{k}']:.3f}"
                     if "pass_at_1" in metrics else ""), flush=True)
            self.record(metrics)
            if fail_at_step == step + 1:
                if saving is not None:  # so the test knows which checkpoint the restart finds
                    checkpoint, saving = wait_for(saving, self.timeout, "saving a checkpoint"), None
                print(f"injected failure: killing a rollout actor after step {step + 1}", flush=True)
                ray.kill(self.rollouts.actors[-1])
        if saving is not None:
            checkpoint = wait_for(saving, self.timeout, "saving the last checkpoint")
        return {"metrics": self.history[-1] if self.history else {}, "checkpoint": checkpoint, "history": self.history}
