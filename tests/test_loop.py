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


def step_gradient(monkeypatch, rows: np.ndarray, **overrides) -> list[torch.Tensor]:
    """The gradient one step of the loop hands to the optimizers (which are not stepped)."""
    from nanochat_ray.train import loop
    grads = []

    def capture(optimizers, max_grad_norm):
        grads.extend(p.grad.clone() for opt in optimizers for group in opt.param_groups for p in group["params"])
    monkeypatch.setattr(loop, "step_optimizers", capture)
    train(steps=1, rows=rows, **overrides)
    return grads


def test_loss_is_the_mean_of_micro_batch_means_as_the_reference(monkeypatch):
    # SFT-like rows: the first micro-batch counts 2 targets, the second 64 per row
    mask = np.ones_like(ROWS)
    mask[:2, :63] = 0
    masked = np.stack([ROWS, mask], axis=1)[:4]
    got = step_gradient(monkeypatch, masked, device_batch_size=2)
    token_weighted = step_gradient(monkeypatch, masked, device_batch_size=2, loss_weighting="token")

    torch.manual_seed(0)
    model = build_gpt(make_config("smoke").gpt_config())
    for m in range(2):  # each micro-batch's mean loss, averaged over the two
        (model(*to_batch(masked[2 * m:2 * m + 2], torch.device("cpu"))) / 2).backward()
    want = [p.grad for opt in build_optimizers(model) for group in opt.param_groups for p in group["params"]]
    for a, b, c in zip(got, want, token_weighted):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(a, c, rtol=1e-2, atol=1e-6) for a, c in zip(got, token_weighted))
