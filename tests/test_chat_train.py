"""Midtraining and SFT on Ray Train (smoke preset): they start from the previous stage, learn,
and save loadable checkpoints; the data they see is fixed by the step."""

import json

import numpy as np
import pytest
import torch

from nanochat_ray.checkpoint import build_model_from_checkpoint, checkpoint_dir, latest_step
from nanochat_ray.config import ConfigError, make_config
from nanochat_ray.data.pipeline import padded_rows
from nanochat_ray.tasks import GSM8K
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.data.rows import PAD_ID, to_batch
from nanochat_ray.train.finetune import Fallbacks, chat_train, packed_rows, training_mixture
from nanochat_ray.train.pretrain import pretrain
from nanochat_ray.stage import METRICS_LOG, RunOptions

from test_chat_stream import in_process

MISSING = {"MMLU auxiliary_train", "ARC-Easy train", "ARC-Challenge train"}  # splits the offline mirror lacks


def first_rows(stage, tokenizer_dir, data_root) -> np.ndarray:
    """The rows of the stage's first step (one worker), as the stream serves them (tests/test_chat_stream.py)."""
    mixture = training_mixture(stage, str(data_root), make_config("smoke").seed, Fallbacks(MISSING))
    return in_process(stage, Tokenizer.from_directory(tokenizer_dir), mixture, 0, 0, 1)


@pytest.fixture(scope="module")
def trained(ray_cluster, data_root, smoke_tokenizer_dir, tmp_path_factory):
    """base → mid → sft on the smoke preset, under one artifact root."""
    root = tmp_path_factory.mktemp("chat")
    shards = sorted((data_root / "pretrain_text").glob("shard_*.parquet"))
    pretrain(make_config("smoke"), RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=root),
             train_shards=shards[:1], val_shard=shards[-1])
    for stage, overrides in (("mid", {}), ("sft", dict(init_lr_frac=0.02, warmdown_ratio=1.0))):
        chat_train(stage, make_config("smoke", **overrides), RunOptions(
            tokenizer_dir=smoke_tokenizer_dir, data_root=str(data_root), artifact_root=root, num_workers=2))
    return root


def losses(root, stage):
    lines = (checkpoint_dir(stage, "d2", root) / METRICS_LOG).read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines)]


def test_midtraining_learns_and_saves(trained):
    curve = losses(trained, "mid")
    assert len(curve) == 8 and curve[-1] < curve[0] - 1.0, curve
    model, meta = build_model_from_checkpoint("mid", "d2", root=trained)
    assert meta["stage"] == "mid" and meta["step"] == 8


def test_sft_starts_from_mid_and_saves(trained, smoke_tokenizer_dir, data_root):
    curve = losses(trained, "sft")
    assert len(curve) == 8 and all(np.isfinite(curve))
    # its first loss is the mid model's loss on SFT's first rows: it started from mid
    inputs, targets = to_batch(first_rows("sft", smoke_tokenizer_dir, data_root), torch.device("cpu"))
    mid, _ = build_model_from_checkpoint("mid", "d2", root=trained)
    with torch.no_grad():
        assert curve[0] == pytest.approx(mid(inputs, targets=targets).item(), rel=1e-4)
    _, meta = build_model_from_checkpoint("sft", "d2", root=trained)
    assert meta["stage"] == "sft" and meta["config"]["init_lr_frac"] == 0.02
    assert 0 <= meta["metrics"]["mmlu_acc"] <= 1 and 0 <= meta["metrics"]["arc_easy_acc"] <= 1


def test_stage_needs_the_previous_one(smoke_tokenizer_dir, data_root, tmp_path):
    with pytest.raises(ConfigError, match="jobs/pretrain.py"):
        chat_train("mid", make_config("smoke"), RunOptions(tokenizer_dir=smoke_tokenizer_dir, data_root=str(data_root),
                                                           artifact_root=tmp_path))


def test_packed_rows_keep_masks_and_order(smoke_tokenizer_dir, data_root):
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    task = GSM8K("train", str(data_root), stop=5)
    ids, mask = tokenizer.render_conversation(task[0])
    assert len(ids) > 65  # a conversation spans rows (it is not cut at the row length)
    rows, masked = packed_rows(task, tokenizer, 65), packed_rows(task, tokenizer, 65, masked=True)
    first, first_masked = [next(rows) for _ in range(4)], [next(masked) for _ in range(4)]
    np.testing.assert_array_equal(np.concatenate(first)[:len(ids)], ids[:260])
    np.testing.assert_array_equal(np.concatenate([r[1] for r in first_masked])[:len(mask)], mask[:260])
    assert all(row.shape == (65,) for row in first) and all(row.shape == (2, 65) for row in first_masked)


def test_midtraining_trains_on_every_token_sft_on_the_assistant(smoke_tokenizer_dir, data_root):
    for stage in ("mid", "sft"):
        _, targets = to_batch(first_rows(stage, smoke_tokenizer_dir, data_root), torch.device("cpu"))
        if stage == "mid":  # as the reference's midtraining: user turns and special tokens are targets too
            assert (targets >= 0).all()
        else:
            assert (targets >= 0).any() and (targets == -1).any()


def test_padded_rows():
    rows = padded_rows([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6], [0])])
    np.testing.assert_array_equal(rows[1], [[4, 5, PAD_ID], [0, 1, 0]])  # padding: PAD_ID, masked
    inputs, targets = to_batch(rows, torch.device("cpu"))
    # padding goes in as token 0 and is never a target
    assert inputs.tolist() == [[1, 2], [4, 5], [6, 0]] and targets.tolist() == [[2, 3], [5, -1], [-1, -1]]


def test_only_pretraining_clips_and_sft_keeps_muon_momentum_constant():
    from nanochat_ray.config import stage_defaults

    preset = make_config("cpu")
    assert preset.grad_clip == 1.0 and preset.muon_momentum_warmup == 300  # pretraining
    mid, sft_cfg, rl = (stage_defaults(stage, "cpu") for stage in ("mid", "sft", "rl"))
    assert mid["grad_clip"] == sft_cfg["grad_clip"] == rl["grad_clip"] == 0.0
    assert "muon_momentum_warmup" not in mid  # midtraining ramps momentum like pretraining, as the reference
    assert sft_cfg["muon_momentum_warmup"] == rl["muon_momentum_warmup"] == 0
