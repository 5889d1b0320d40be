"""Pretraining on Ray Train (smoke preset, CPU workers over gloo): equivalence, resume, failures."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_ray.checkpoint import checkpoint_dir, latest_step, load_checkpoint
from nanochat_ray.config import ConfigError, make_config
from nanochat_ray.train.pretrain import pretrain
from nanochat_ray.stage import METRICS_LOG, TRAINING_GAUGES, NullLogger, RunOptions, make_logger

STEPS = 8  # smoke preset: checkpoints at steps 4 and 8


def losses(root: Path, model_tag: str = "d2") -> dict[int, float]:
    """step -> loss; a step run again after a restart keeps its last value."""
    lines = (checkpoint_dir("base", model_tag, root) / METRICS_LOG).read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


@pytest.fixture(scope="module")
def shards(data_root):
    pretrain_text = sorted((data_root / "pretrain_text").glob("shard_*.parquet"))
    return pretrain_text[:1], pretrain_text[-1]  # one train shard is plenty for a few steps


@pytest.fixture(scope="module")
def run(ray_cluster, shards, smoke_tokenizer_dir, tmp_path_factory, data_root):
    """run(name, **options) trains the smoke model under its own artifact root."""
    def run(name: str, **options) -> Path:
        root = tmp_path_factory.mktemp(name) if "artifact_root" not in options else options.pop("artifact_root")
        cfg = make_config("smoke", **options.pop("config", {}))
        pretrain(cfg, RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=root, **options), train_shards=shards[0],
                 val_shard=shards[1], core_bundle=data_root / "core_eval_bundle")
        return root
    return run


@pytest.fixture(scope="module")
def one_worker(run) -> Path:
    # CORE at the last step, on one example of each task
    return run("one_worker", num_workers=1, config={"core_every": STEPS, "core_max_per_task": 1})


def test_one_worker_trains_and_checkpoints(one_worker):
    curve = losses(one_worker)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[1] == pytest.approx(torch.log(torch.tensor(1024.0)).item(), abs=1e-4)  # zero lm_head
    assert curve[STEPS] < curve[1] - 0.5, curve  # it learns
    stage = checkpoint_dir("base", "d2", one_worker)
    assert latest_step(stage) == STEPS
    _, _, meta = load_checkpoint(stage, load_optimizer=False)
    assert meta["train_state"]["step"] == STEPS and meta["metrics"]["val_bpb"] > 0
    assert -1 <= meta["metrics"]["core"] <= 1
    assert meta["train_state"]["data_position"]["row"] > 0


def test_two_workers_match_one_worker(run, one_worker):
    # same total batch and seed: 1 worker accumulates 2 micro-batches, 2 workers take one each.
    # Muon's bf16 Newton–Schulz turns fp32 summation-order noise into bf16 ulps, hence 1e-3.
    two = run("two_workers", num_workers=2)
    expected, got = losses(one_worker), losses(two)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-3), (step, got, expected)


def test_interrupt_then_resume_matches_uninterrupted(run, one_worker, tmp_path):
    # the run dies right after its step-4 checkpoint and is not restarted (max_failures=0) ...
    with pytest.raises(Exception):
        run("interrupted", num_workers=1, artifact_root=tmp_path, max_failures=0, fail_at_step=4)
    assert latest_step(checkpoint_dir("base", "d2", tmp_path)) == 4
    # ... then --resume carries on from there with the same data order
    run("resumed", num_workers=1, artifact_root=tmp_path, resume=True)
    expected, got = losses(one_worker), losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)


def test_killed_worker_restarts_from_checkpoint(run, one_worker):
    # rank 1 exits hard after step 6; FailureConfig restarts the group from the step-4 checkpoint
    root = run("killed", num_workers=2, max_failures=1, fail_at_step=6)
    log = (checkpoint_dir("base", "d2", root) / METRICS_LOG).read_text().splitlines()
    # steps 5 and 6 ran twice, but the restart cut the log back to the step-4 checkpoint
    assert [json.loads(line)["step"] for line in log] == list(range(1, STEPS + 1))
    got, expected = losses(root), losses(one_worker)
    assert latest_step(checkpoint_dir("base", "d2", root)) == STEPS
    assert got[STEPS] == pytest.approx(expected[STEPS], rel=1e-3)


def test_existing_run_needs_resume_or_fresh(run, one_worker):
    with pytest.raises(ConfigError, match="--resume"):
        run("again", artifact_root=one_worker, num_workers=1)


def test_corrupt_shard_is_named(run, smoke_tokenizer_dir, shards, tmp_path):
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="shard_00000.parquet"):
        pretrain(make_config("smoke"), RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=tmp_path),
                 train_shards=[bad], val_shard=shards[1])


def test_config_errors_come_before_ray(smoke_tokenizer_dir, shards, tmp_path):
    with pytest.raises(ConfigError, match="workers 3"):
        pretrain(make_config("smoke"), RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=tmp_path, num_workers=3),
                 train_shards=shards[0], val_shard=shards[1])
    with pytest.raises(ConfigError, match="vocab_size"):
        pretrain(make_config("smoke", vocab_size=2048), RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=tmp_path),
                 train_shards=shards[0], val_shard=shards[1])


def test_wandb_logs_offline_when_a_run_name_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert isinstance(make_logger(make_config("smoke"), "base", rank=0), NullLogger)  # run "dummy"
    assert isinstance(make_logger(make_config("smoke", run="exp"), "base", rank=1), NullLogger)  # rank 0 only
    logger = make_logger(make_config("smoke", run="exp"), "base", rank=0)
    logger.log({"loss": 1.5}, step=1)
    logger.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_dashboard_metric_names_are_valid_prometheus_names():
    # Ray drops metrics with other names, with only a warning
    for stage in ("base", "mid", "sft"):
        for name in TRAINING_GAUGES:
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", f"nanochat_{stage}_{name}")


@pytest.mark.parametrize("actor, idle, nice", [("DataActor", True, 0), ("StepFeeder", False, 10)])
def test_background_data_actors_leave_the_cores_to_training(actor, idle, nice):
    # a CPU-only run's Ray Data actors take a core only when nothing else wants it; its feeders,
    # which answer the workers' calls, are niced instead (each in a process of its own)
    code = (f"import os; from nanochat_ray.data.pipeline import {actor}; before = os.nice(0); {actor}(True); "
            "print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.nice(0) - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == [str(idle), str(nice)], out.stdout + out.stderr
