"""
The Ray actors of RL: rollout workers that sample and score, and the one learner that updates.

    worker = RolloutActor.remote(cfg, tokenizer_dir, data_root)
    learner = LearnerActor.remote(cfg, stage_dir, init_from, resume, meta)
    version, [weights] = ray.get(learner.publish.remote())   # one ray.put per weight version
    ray.get(worker.load_weights.remote(version, weights))
    result = worker.rollout.remote(version, "gsm8k", "train", indices, seeds, 16, 256)
    learner.accumulate.remote(result); ray.get(learner.step.remote(num_iterations))

A worker refuses to sample with weights other than the version asked for (StaleWeightsError)
unless allow_stale is set, so on-policy training can't silently use old weights.

Run by: python jobs/rl.py --preset cpu.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from nanochat_ray.checkpoint import latest_step, load_checkpoint, read_checkpoint, save_checkpoint
from nanochat_ray.common import autocast, compute_dtype, default_device
from nanochat_ray.config import Config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.optim import step_optimizers
from nanochat_ray.rl.policy import Group, question_loss, sample_groups
from nanochat_ray.rl.tasks import RewardTask, load_reward_task
from nanochat_ray.stage import apply_schedule, checkpoint_meta, stage_optimizers, without_compile_prefix
from nanochat_ray.tokenizer import Tokenizer


class StaleWeightsError(RuntimeError):
    """A rollout was asked for with a weight version the worker does not hold."""


@dataclass
class RolloutResult:
    version: int  # weights the samples came from
    indices: list[int]  # task examples, one group each
    groups: list[Group]  # with rewards
    seconds: float  # time the worker spent sampling and scoring


class RolloutWorker:
    """A model copy and the engine; samples groups of completions and scores them."""

    def __init__(self, cfg: Config, tokenizer_dir: str, data_root: str | None):
        self.device = default_device()
        self.model = build_gpt(cfg.gpt_config(), self.device).eval()
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)
        self.autocast = autocast(self.device, compute_dtype(cfg.dtype, self.device))
        self.data_root = data_root
        self.tasks: dict[tuple[str, str], RewardTask] = {}
        self.version: int | None = None

    def load_weights(self, version: int, state: dict) -> int:
        self.model.load_state_dict(state)
        self.version = version
        return version

    def rollout(self, version: int, task: str, split: str, indices: list[int], seeds: list[int], num_samples: int,
                max_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
                allow_stale: bool = False) -> RolloutResult:
        """num_samples completions of each example (sample i of example j seeded seeds[j] + i), scored."""
        if self.version is None or (self.version != version and not allow_stale):
            raise StaleWeightsError(f"asked to sample with weights v{version} but this worker holds "
                                    f"{'none' if self.version is None else f'v{self.version}'}: publish them first "
                                    f"(or pass allow_stale=True to accept older weights)")
        start = time.perf_counter()
        key = (task, split)
        if key not in self.tasks:
            self.tasks[key] = load_reward_task(task, split, self.data_root)
        examples = [self.tasks[key][i] for i in indices]
        prompts = [self.tokenizer.render_for_completion(example) for example in examples]
        with self.autocast:
            groups = sample_groups(self.model, self.tokenizer, prompts, seeds, num_samples, max_tokens,
                                   temperature, top_k)
        for group, example in zip(groups, examples):
            group.rewards = [self.tasks[key].reward(example, c) for c in group.completions(self.tokenizer)]
        return RolloutResult(self.version, list(indices), groups, time.perf_counter() - start)


# -----------------------------------------------------------------------------


class Learner:
    """The policy being trained: model, optimizers, step count; gradients stream in per rollout."""

    def __init__(self, cfg: Config, stage_dir: str, init_from: str | None, resume: bool, meta: dict,
                 fail_at_step: int | None = None):
        self.cfg, self.stage_dir, self.meta = cfg, Path(stage_dir), meta
        self.fail_at_step = fail_at_step  # tests: the update to this step raises, once
        self.device = default_device()
        self.dtype = compute_dtype(cfg.dtype, self.device)
        self.autocast = autocast(self.device, self.dtype)
        torch.manual_seed(cfg.seed)
        self.model = build_gpt(cfg.gpt_config(), self.device)
        self.optimizers = stage_optimizers(self.model, cfg)  # SPEC §10: 5% of the base LRs
        self.step_count, self.train_seconds = 0, 0.0
        if resume and latest_step(self.stage_dir) is not None:
            model_state, optim_state, saved = load_checkpoint(self.stage_dir, device=self.device)
            for opt, state in zip(self.optimizers, optim_state):
                opt.load_state_dict(state)
            self.step_count, self.train_seconds = saved["step"], saved["train_state"]["train_seconds"]
            self.started_from = f"{self.stage_dir} step {saved['step']}"
        elif init_from is not None:
            model_state, _, _ = read_checkpoint(init_from, self.device, load_optimizer=False)
            self.started_from = init_from
        else:
            raise ValueError("the learner needs a checkpoint to start from (init_from) or an rl run to resume")
        self.model.load_state_dict(without_compile_prefix(model_state))
        self.version: int = self.step_count  # weights after this many updates
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.questions, self.valid_tokens, self.busy_seconds = 0.0, 0, 0, 0.0
        self.model.zero_grad(set_to_none=True)

    def describe(self) -> dict:
        return {"step": self.step_count, "started_from": self.started_from}

    def publish(self) -> tuple[int, list]:
        """(version, [reference]): the current weights in the compute dtype, put in the object store
        once; the reference travels in a list so Ray hands callers the reference, not the tensors.

        Rollouts run under the same autocast, whose matmuls see these bf16 values either way: fp32
        would double the bytes every actor loads each step (2.2 GB at d20) for nothing.
        """
        state = {k: v.detach().to("cpu", dtype=self.dtype, copy=True) for k, v in self.model.state_dict().items()}
        return self.version, [ray.put(state)]

    def accumulate(self, result: RolloutResult) -> None:
        """Add one rollout's gradient, each question's normalised by its own sampled tokens; step()
        divides by the step's number of questions."""
        if result.version != self.version:
            raise StaleWeightsError(f"a rollout from weights v{result.version} reached the learner at "
                                    f"v{self.version}: on-policy training takes current samples only")
        start = time.perf_counter()
        self.model.train()
        for group in result.groups:
            # as many whole sequences per forward as fit the token budget of a training micro-step
            longest = len(group.prompt) + max(map(len, group.tokens))
            rows = max(1, self.cfg.device_batch_size * self.cfg.seq_len // longest)
            self.loss_sum += question_loss(self.model, group, rows, self.autocast)
            self.questions += 1
            self.valid_tokens += sum(map(sum, group.masks))
        self.busy_seconds += time.perf_counter() - start

    def step(self, num_iterations: int) -> dict:
        """Average over the step's questions, apply the LR schedule, update; returns its metrics."""
        if self.fail_at_step == self.step_count + 1:
            self.fail_at_step = None
            raise RuntimeError(f"injected learner failure in the update to step {self.step_count + 1}")
        start = time.perf_counter()
        questions = max(1, self.questions)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(questions)
        multiplier = apply_schedule(self.optimizers, self.cfg, self.step_count, num_iterations)
        grad_norm = step_optimizers(self.optimizers, self.cfg.grad_clip)
        self.step_count += 1
        self.version = self.step_count
        seconds = self.busy_seconds + time.perf_counter() - start
        self.train_seconds += seconds
        metrics = {"loss": self.loss_sum / questions, "valid_tokens": self.valid_tokens, "lr_multiplier": multiplier,
                   "learner_seconds": seconds} | ({"grad_norm": grad_norm} if grad_norm is not None else {})
        self._reset()
        return metrics

    def save(self, metrics: dict) -> str:
        """Checkpoint the current step as stage rl (atomic; LATEST moves last)."""
        meta = self.meta | checkpoint_meta("rl", self.cfg, self.step_count,
                                           {"step": self.step_count, "train_seconds": self.train_seconds}, metrics)
        path = save_checkpoint(self.stage_dir, self.step_count, self.model.state_dict(),
                               [opt.state_dict() for opt in self.optimizers], meta)
        return str(path)


RolloutActor = ray.remote(RolloutWorker)
LearnerActor = ray.remote(Learner)
