"""The plan (nanochat_ray/plan.py): validated against measured CPU steps (a) and the reference's
own observations on 80 GB H100s (b); refusal with the batch that fits; the GPU kinds table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat_ray import gpt
from nanochat_ray.config import make_config
from nanochat_ray.gpus import gpu_kind, kind_of_device
from nanochat_ray.plan import GiB, cpu_estimate, make_plan, refusal

ROOT = Path(__file__).resolve().parents[1]
H100 = gpu_kind("h100-80gb")

# (a): head-heavy steps with several chunks of the head (B·T = 2 × gpt.HEAD_CHUNK_ROWS) and with one
# (B·T < HEAD_CHUNK_ROWS), an activation-heavy one, and one with gradient accumulation
MEASURED = [
    dict(depth=1, vocab_size=2048, seq_len=512, device_batch_size=16, total_batch_size=8192, eval_tokens=8192),
    dict(depth=2, vocab_size=8192, seq_len=256, device_batch_size=4, total_batch_size=1024),
    dict(depth=4, head_dim=64, vocab_size=512, seq_len=512, device_batch_size=4, total_batch_size=2048),
    dict(depth=2, vocab_size=4096, seq_len=256, device_batch_size=2, total_batch_size=1024),
]


def test_plan_matches_the_measured_cpu_step():
    """Peak RSS of a real second training step (train/loop.py, fp32 eager), in a fresh process
    whose freed tensors go back to the OS, is within 15% of the plan's figure."""
    code = ("import json, sys, torch; torch.set_num_threads(1)\n"
            "from nanochat_ray.config import make_config\n"
            "from nanochat_ray.plan import measure_cpu_step\n"
            "print(json.dumps([measure_cpu_step(make_config('smoke', **kw))['peak_above'] "
            "for kw in json.loads(sys.argv[1])]))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(MEASURED)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    for kw, peak in zip(MEASURED, measured):
        estimate = cpu_estimate(make_config("smoke", **kw))["peak_above"]
        assert abs(estimate - peak) <= 0.15 * peak, f"{kw}: plan {estimate / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("depth, batch, fits", [(20, 32, True), (26, 32, False), (26, 16, True),
                                                (32, 16, False), (32, 8, True)])
def test_reference_step_fits_as_its_authors_saw(depth, batch, fits):
    """(b) The reference on 8 × 80 GB H100s: d20 at device batch 32 fits; d26 at 32 does not, at 16
    it does; d32 at 16 does not, at 8 it does."""
    cfg = make_config(f"d{depth}", device_batch_size=batch)
    pretrain = make_plan(cfg, H100, 8, reference=True).rows[0]
    assert pretrain.stage == "pretrain step" and pretrain.fits == fits
    if not fits:
        assert pretrain.largest_batch == batch // 2


def test_reference_d20_is_at_the_edge():
    # a later reference version OOMed at this shape needing ~2 GiB more (karpathy/nanochat #443)
    plan = make_plan(make_config("d20"), H100, 8, reference=True)
    assert plan.usable - 2 * GiB < plan.rows[0].memory.total <= plan.usable


def test_a_config_that_does_not_fit_is_refused_with_the_batch_that_would():
    plan = make_plan(make_config("d26"), gpu_kind("a100-40gb"), 8, reference=True)
    message = refusal(plan)
    assert message is not None and "pretrain step" in message and "--device-batch-size 8" in message
    out = subprocess.run([sys.executable, "jobs/plan.py", "--preset", "d26", "--gpu", "a100-40gb", "--as-reference"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and "--device-batch-size 8" in out.stdout, out.stdout + out.stderr


def test_measured_configs_cover_one_and_several_head_chunks():
    tokens = [kw["device_batch_size"] * kw["seq_len"] for kw in MEASURED]
    assert max(tokens) > gpt.HEAD_CHUNK_ROWS > min(tokens)


def test_d20_fits_8_h100_with_the_defaults():
    plan = make_plan(make_config("d20"), H100, 8)
    assert refusal(plan) is None
    rows = {row.stage: row for row in plan.rows}
    # the learner takes one question's 16 samples per forward (its loss is normalised on its own)
    assert rows["RL learner"].shape.startswith("16 × 511")


def test_chunked_head_keeps_evaluation_below_training():
    rows = {row.stage: row for row in make_plan(make_config("d20"), H100, 8).rows}
    assert rows["val bpb (in training)"].memory.total <= rows["pretrain step"].memory.total
    assert rows["CORE"].memory.total <= rows["pretrain step"].memory.total


@pytest.mark.parametrize("device, kind", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"), ("NVIDIA A10G", "a10g"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("A100-80G", "a100-80gb")])
def test_device_names_map_to_gpu_kinds(device, kind):
    assert kind_of_device(device).name == kind


def test_unknown_gpu_is_none_and_unknown_kind_is_an_error():
    assert kind_of_device("Tesla K80") is None
    with pytest.raises(ValueError, match="known kinds"):
        gpu_kind("tpu")
