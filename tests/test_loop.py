"""The plain training loop in one process (no Ray): accumulation, masks, resume state."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

from nanochat_ray.common import maybe_compile
from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.optim import build_optimizers
from nanochat_ray.data.rows import PAD_ID, to_batch
from nanochat_ray.train.loop import TrainState, run

ROWS = np.random.default_rng(0).integers(0, 1024, size=(40, 65), dtype=np.int32)  # 10 steps × 4 rows of T+1


def train(steps: int = 6, rows: np.ndarray = ROWS, world: tuple[int, int] = (0, 1), **overrides) -> tuple[list[dict], dict]:
    """(metrics of each step, final weights). world = (rank, size): this rank's share of each step."""
    cfg = make_config("smoke", num_iterations=steps, eval_every=-1, **overrides)
    torch.manual_seed(0)
    model = build_gpt(cfg.gpt_config())
    per_step = cfg.total_batch_size // cfg.seq_len
    rank, size = world
    share = per_step // size
    history = []

    def batches(step: int):
        first = step * per_step + rank * share
        return lambda: (rows[first:first + share], {"row": (step + 1) * per_step})

    state = run(cfg, model, build_optimizers(model), batches, lambda metrics, state, save: history.append(metrics),
                TrainState(), steps, peak_flops=1e9, step_model=maybe_compile(model, cfg.compile, torch.device("cpu")))
    assert state.step == steps and state.data_position == {"row": steps * per_step}
    return history, model.state_dict()


def test_accumulation_does_not_change_the_result():
    # 4 rows per step as 2 micro-batches of 2, or as 1 micro-batch of 4
    two = [m["loss"] for m in train(device_batch_size=2)[0]]
    one = [m["loss"] for m in train(device_batch_size=4, eval_tokens=256)[0]]
    assert one == pytest.approx(two, rel=1e-4)


def test_masked_targets_are_ignored():
    mask = np.zeros_like(ROWS)
    mask[:, 33:] = 1  # train on the second half of each row only
    masked = np.stack([ROWS, mask], axis=1)  # (rows, 2, T+1)
    inputs, targets = to_batch(masked[:2], torch.device("cpu"))
    assert (targets[:, :32] == -1).all() and (targets[:, 32:] == torch.from_numpy(ROWS[:2, 33:]).long()).all()
    # the first step's loss is the mean over the counted targets only: with a zero lm_head every
    # target costs ln(vocab), so the mean is exactly that whatever the mask
    first = train(steps=1, rows=masked)[0][0]
    assert first["loss"] == pytest.approx(np.log(1024), abs=1e-4)


def test_metrics_each_step(capsys):
    history, _ = train(steps=3)
    # and one printed line per step, with its rate and the ETA
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 00001/3", "step 00002/3", "step 00003/3"]
    assert all(" tok/s | " in line and " | eta " in line for line in lines)
    assert [m["step"] for m in history] == [1, 2, 3]
    for m in history:
        assert {"loss", "loss_ema", "lr_multiplier", "tokens_per_second", "mfu", "data_wait_fraction",
                "grad_norm"} <= set(m)
        assert 0 <= m["data_wait_fraction"] <= 1


def test_tokens_per_second_counts_real_tokens_not_padding():
    # SFT rows: conversations of 21 and 41 tokens, padded to the row length with PAD_ID
    tokens, mask = ROWS[:8].copy(), np.ones_like(ROWS[:8])
    for r, length in enumerate([21, 41] * 4):
        tokens[r, length:], mask[r, length:] = PAD_ID, 0
    history, _ = train(steps=2, rows=np.stack([tokens, mask], axis=1))
    for m in history:  # 4 rows a step: inputs are each row's tokens but the last
        assert m["tokens_per_second"] * m["step_seconds"] == pytest.approx(2 * (20 + 40))


# -----------------------------------------------------------------------------
# the GPU path (bf16 autocast, torch.compile, the chunked head, DDP-style gradient sync) on CPU,
# with gloo standing in for NCCL: what --use-gpu's dtype=auto and compile=auto pick on CUDA


def _gpu_path_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        history, weights = train(steps=2, dtype="bfloat16", compile="on", world=(rank, world))
        torch.save({"history": history, "weights": weights, "graphs": counters["stats"]["unique_graphs"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_gpu_path_runs_on_cpu_bf16_compiled_on_two_gloo_workers(tmp_path):
    eager, _ = train(steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gpu_path_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        assert rank["graphs"] >= 1, "the step ran through torch.compile"
        # the zero lm_head makes the first loss ln(vocab) exactly; the second, after one bf16
        # update, agrees with the fp32 eager run to bf16 precision
        assert rank["history"][0]["loss"] == pytest.approx(np.log(1024), abs=1e-4)
        assert rank["history"][1]["loss"] == pytest.approx(eager[1]["loss"], rel=2e-2)
    for name, weight in ranks[0]["weights"].items():  # the ranks stayed in sync
        assert torch.equal(weight, ranks[1]["weights"][name]), name



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
