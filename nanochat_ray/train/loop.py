"""
The pretraining loop of one worker, plain PyTorch: no Ray in here.

    run(cfg, model, optimizers, batches, hooks, state, num_iterations)

`batches(step)` returns this worker's rows for a step and the data position after it;
`hooks` report metrics and save checkpoints. The Ray Train worker (train/pretrain.py) and
the tests plug in their own, so the same loop runs under TorchTrainer and in one process.
Gradients are synced by the distributed optimizers (optim.py), not by a DDP wrapper.

Run by: python jobs/pretrain.py (and midtrain.py, sft.py); tested by python -m pytest tests/test_loop.py.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from nanochat_ray.common import autocast, compute_dtype, print0, rank_world
from nanochat_ray.config import Config
from nanochat_ray.data.rows import PAD_ID, to_batch
from nanochat_ray.gpt import GPT
from nanochat_ray.optim import step_optimizers
from nanochat_ray.stage import apply_schedule

@dataclass
class TrainState:
    """What a resume needs besides weights and optimizer state."""
    step: int = 0  # optimizer steps done
    data_position: dict = field(default_factory=lambda: {"epoch": 0, "item": 0, "row": 0})
    loss_ema: float = 0.0  # raw EMA; de-biased when logged
    train_seconds: float = 0.0  # time inside steps, excluding evals and checkpoints


# batches(step) asks for a step's rows and returns a function that waits for them:
# () -> (rows (accum·B, T+1), data position after the step)
Batches = Callable[[int], Callable[[], tuple[np.ndarray, dict]]]
# report(metrics, state, save): called once per step on every worker, the same number of times
Report = Callable[[dict, TrainState, bool], None]
# (every N steps, evaluation returning metrics), e.g. (cfg.eval_every, val_bpb)
Periodic = Sequence[tuple[int, Callable[[], dict]]]


def real_tokens(rows: np.ndarray) -> int:
    """Input positions whose next token is real, not padding (SFT pads rows to their longest
    conversation): what tokens/s counts. A pretraining row of T+1 tokens has T."""
    return int((rows[:, 0, 1:] != PAD_ID).sum()) if rows.ndim == 3 else rows.shape[0] * (rows.shape[-1] - 1)


def sum_over_workers(value: torch.Tensor) -> torch.Tensor:
    if rank_world()[1] > 1:
        dist.all_reduce(value)
    return value


def run(cfg: Config, model: GPT, optimizers: list[torch.optim.Optimizer], batches: Batches,
        report: Report, state: TrainState, num_iterations: int, peak_flops: float | Callable[[], float | None],
        step_model: torch.nn.Module | None = None, periodic: Periodic = ()) -> TrainState:
    """Train from state.step to num_iterations; returns the final state.

    `step_model` is what the forward calls (e.g. the compiled model); `model` owns the weights.
    `peak_flops` is one worker's peak, for MFU (or a function giving it, None while it is being
    measured: MFU is left out of those steps' metrics). Each (every, function) of `periodic` (val bpb,
    CORE, samples) runs every `every` steps (never when ≤ 0) and at the end; its dict joins the
    metrics.
    """
    _, world_size = rank_world()
    device = next(model.parameters()).device
    ctx = autocast(device, compute_dtype(cfg.dtype, device))
    step_model = model if step_model is None else step_model  # (a compiled module has no truth value)
    accum, micro_rows = cfg.grad_accum_steps(world_size), cfg.device_batch_size
    flops_per_token = model.estimate_flops()
    ema_beta = 0.9
    first_step, run_start = state.step, time.perf_counter()

    model.train()
    pending = batches(state.step)
    while state.step < num_iterations:
        step = state.step
        start = time.perf_counter()
        multiplier = apply_schedule(optimizers, cfg, step, num_iterations)

        rows, position = pending()  # blocks only when the data pipeline is behind
        waited = time.perf_counter() - start
        if step + 1 < num_iterations:
            pending = batches(step + 1)  # the next rows arrive while this step computes
        micro_batches = [to_batch(rows[m * micro_rows:(m + 1) * micro_rows], device) for m in range(accum)]
        counts = [(targets >= 0).sum() for _, targets in micro_batches]
        totals = sum_over_workers(torch.stack([sum(counts), torch.tensor(real_tokens(rows), device=device)]))
        # (at least 1: a step of SFT rows cut before the assistant speaks has nothing to learn)
        counted = totals[0].clamp(min=1)
        if cfg.loss_weighting == "token":
            # the mean over every counted target of the step, on all workers together, so the split
            # over workers and micro-batches changes nothing (the optimizers average over workers,
            # hence the world_size factor)
            weights = [world_size / counted] * accum
        else:
            # the reference's: each micro-batch's mean, averaged over micro-batches and workers, so
            # a micro-batch of short answers weighs as much as one of long chats
            weights = [1 / (count.clamp(min=1) * accum) for count in counts]
        loss_sum = torch.zeros((), device=device)
        for (inputs, targets), weight in zip(micro_batches, weights):
            with ctx:
                loss = step_model(inputs, targets=targets, loss_reduction="sum")
            loss_sum += loss.detach()
            (loss * weight).backward()
        # clips by the norm of the gradient averaged over workers, so 1 and N workers agree
        grad_norm = step_optimizers(optimizers, cfg.grad_clip)
        model.zero_grad(set_to_none=True)
        loss_value = (sum_over_workers(loss_sum) / counted).item()  # a CPU↔GPU sync point, once per step
        step_seconds = time.perf_counter() - start

        state.step += 1
        state.data_position = position
        state.train_seconds += step_seconds
        state.loss_ema = ema_beta * state.loss_ema + (1 - ema_beta) * loss_value
        tokens_per_second = int(totals[1]) / step_seconds  # real tokens: padding is work, not tokens
        peak = peak_flops() if callable(peak_flops) else peak_flops
        metrics = {
            "step": state.step, "loss": loss_value,
            "loss_ema": state.loss_ema / (1 - ema_beta ** state.step),  # de-biased
            "lr_multiplier": multiplier, "step_seconds": step_seconds,
            "tokens_per_second": tokens_per_second,
            "data_wait_fraction": waited / step_seconds, "train_seconds": state.train_seconds,
        } | ({"grad_norm": grad_norm} if grad_norm is not None else {}) \
          | ({"mfu": tokens_per_second * flops_per_token / (peak * world_size)} if peak else {})
        last = state.step == num_iterations
        for every, extra in periodic:
            if every > 0 and (state.step % every == 0 or last):
                model.eval()
                metrics.update(extra())
                model.train()
        eta = (num_iterations - state.step) * (time.perf_counter() - run_start) / (state.step - first_step)
        print0(f"step {state.step:05d}/{num_iterations} | loss {metrics['loss_ema']:.4f} | lrm {multiplier:.2f} | "
               f"{step_seconds * 1000:.0f} ms | {tokens_per_second:,.0f} tok/s | mfu {100 * metrics.get('mfu', float('nan')):.1f}% | "
               f"data wait {100 * metrics['data_wait_fraction']:.1f}% | eta {eta / 60:.1f} min"
               + (f" | val bpb {metrics['val_bpb']:.4f}" if "val_bpb" in metrics else ""))
        report(metrics, state, last or (cfg.save_every > 0 and state.step % cfg.save_every == 0))
    return state
