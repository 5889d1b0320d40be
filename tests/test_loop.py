"""The plain training loop in one process (no Ray): accumulation, masks, resume state."""

import numpy as np
import pytest
import torch

from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.optim import build_optimizers
from nanochat_ray.train.loop import TrainState, run, to_batch

ROWS = np.random.default_rng(0).integers(0, 1024, size=(40, 65), dtype=np.int32)  # 10 steps × 4 rows of T+1


def train(steps: int = 6, rows: np.ndarray = ROWS, **overrides) -> list[dict]:
    cfg = make_config("smoke", num_iterations=steps, eval_every=-1, **overrides)
    torch.manual_seed(0)
    model = build_gpt(cfg.gpt_config())
    per_step = cfg.total_batch_size // cfg.seq_len
    history = []

    def batches(step: int):
        return lambda: (rows[step * per_step:(step + 1) * per_step], {"row": (step + 1) * per_step})

    state = run(cfg, model, build_optimizers(model), batches, lambda metrics, state, save: history.append(metrics),
                TrainState(), steps, peak_flops=1e9)
    assert state.step == steps and state.data_position == {"row": steps * per_step}
    return history


def test_accumulation_does_not_change_the_result():
    # 4 rows per step as 2 micro-batches of 2, or as 1 micro-batch of 4
    two = [m["loss"] for m in train(device_batch_size=2)]
    one = [m["loss"] for m in train(device_batch_size=4, eval_tokens=256)]
    assert one == pytest.approx(two, rel=1e-4)


def test_masked_targets_are_ignored():
    mask = np.zeros_like(ROWS)
    mask[:, 33:] = 1  # train on the second half of each row only
    masked = np.stack([ROWS, mask], axis=1)  # (rows, 2, T+1)
    inputs, targets = to_batch(masked[:2], torch.device("cpu"))
    assert (targets[:, :32] == -1).all() and (targets[:, 32:] == torch.from_numpy(ROWS[:2, 33:]).long()).all()
    # the first step's loss is the mean over the counted targets only: with a zero lm_head every
    # target costs ln(vocab), so the mean is exactly that whatever the mask
    first = train(steps=1, rows=masked)[0]
    assert first["loss"] == pytest.approx(np.log(1024), abs=1e-4)


def test_metrics_each_step():
    history = train(steps=3)
    assert [m["step"] for m in history] == [1, 2, 3]
    for m in history:
        assert {"loss", "loss_ema", "lr_multiplier", "tokens_per_second", "mfu", "data_wait_fraction",
                "grad_norm"} <= set(m)
        assert 0 <= m["data_wait_fraction"] <= 1
