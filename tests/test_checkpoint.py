"""Checkpoint format: round trip, atomicity, corruption detection, per-rank optimizer shards."""

import dataclasses
import json
import threading

import pytest
import torch

from nanochat_ray.checkpoint import (
    LATEST_FILE, CheckpointError, build_model_from_checkpoint, checkpoint_dir, finalize_checkpoint,
    describe_file, latest_step, load_checkpoint, read_checkpoint, save_checkpoint, step_name,
    write_checkpoint,
)
from nanochat_ray.gpt import GPT, GPTConfig, build_gpt

TINY = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = build_gpt(TINY)
    # init zeroes the output projections; perturb them so the logits depend on every weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def trained_optimizer(model: GPT) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    model(idx, targets=idx).backward()
    opt.step()
    return opt


def meta_for(step: int) -> dict:
    return {"model_config": dataclasses.asdict(TINY), "run_config": {"depth": 2, "lr": 0.02},
            "data_position": {"shard": 1, "row_group": 3}, "metrics": {"val_bpb": 1.5 - step / 100}}


def save(stage_dir, step, model=None, **kwargs):
    model = model or tiny_model(step)
    return save_checkpoint(stage_dir, step, model.state_dict(), [{"step": step}], meta_for(step), **kwargs)


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return checkpoint_dir("base", "d2")


def test_round_trip(stage_dir, tmp_path):
    model = tiny_model()
    opt = trained_optimizer(model)
    path = save_checkpoint(stage_dir, 7, model.state_dict(), [opt.state_dict()], meta_for(7))
    assert path == tmp_path / "checkpoints" / "base" / "d2" / "step_000007"
    assert (stage_dir / LATEST_FILE).read_text().strip() == "step_000007"

    model_state, optim_state, meta = load_checkpoint(stage_dir)
    assert model_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(model_state[name], tensor)
    # the optimizer state restores into a fresh optimizer
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(optim_state[0])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # meta comes back as saved, plus step, world size and the manifest; meta.json is readable
    assert {k: meta[k] for k in meta_for(7)} == meta_for(7)
    assert meta["step"] == 7 and meta["world_size"] == 1
    assert set(meta["files"]) == {"model.pt", "optim_rank0.pt"}
    assert json.loads((path / "meta.json").read_text())["metrics"] == meta_for(7)["metrics"]


def test_latest_is_newest_complete_step(stage_dir):
    assert latest_step(stage_dir) is None
    for step in (100, 200, 300):
        save(stage_dir, step)
    assert latest_step(stage_dir) == 300
    # a crash mid-write leaves a temp dir (no meta.json); it is never a candidate
    tmp = stage_dir / f".tmp_{step_name(400)}"
    write_checkpoint(tmp, tiny_model().state_dict(), [{}])
    assert latest_step(stage_dir) == 300
    # the same for a step dir without meta.json (made by hand or by another tool)
    write_checkpoint(stage_dir / step_name(500), tiny_model().state_dict(), [{}])
    with pytest.warns(UserWarning, match="incomplete"):
        (stage_dir / LATEST_FILE).write_text("step_000500\n")
        assert latest_step(stage_dir) == 300
    # LATEST names the last step saved, even when a higher step exists (resumed from an older one)
    save(stage_dir, 250)
    assert latest_step(stage_dir) == 250
    # a crashed save of the same step is cleaned up by the next save
    save(stage_dir, 400)
    assert latest_step(stage_dir) == 400 and not tmp.exists()


def test_truncated_model_file_is_named(stage_dir):
    path = save(stage_dir, 10)
    model_file = path / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(stage_dir, step=10)
    assert str(model_file) in str(info.value) and "--step N" in str(info.value)


def test_corrupt_latest_falls_back_to_previous_good_step(stage_dir):
    save(stage_dir, 1)
    path = save(stage_dir, 2)
    data = bytearray((path / "optim_rank0.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (path / "optim_rank0.pt").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        assert latest_step(stage_dir) == 1
    with pytest.warns(UserWarning):
        _, optim_state, meta = load_checkpoint(stage_dir)
    assert meta["step"] == 1 and optim_state == [{"step": 1}]
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(stage_dir, step=2)


def _manifest_entry(meta):
    return meta["files"]["model.pt"]


@pytest.mark.parametrize("damage", [
    lambda meta: [meta],  # not an object
    lambda meta: {**meta, "files": []},  # wrong type, empty list
    lambda meta: {**meta, "files": {}},  # empty manifest
    lambda meta: {k: v for k, v in meta.items() if k != "files"},
    lambda meta: {k: v for k, v in meta.items() if k != "step"},
    lambda meta: {k: v for k, v in meta.items() if k != "world_size"},
    lambda meta: {**meta, "step": "2"},
    lambda meta: {**meta, "step": 3},  # not the step its directory is named for
    lambda meta: {**meta, "world_size": 0},
    lambda meta: {**meta, "files": {"optim_rank0.pt": meta["files"]["optim_rank0.pt"]}},  # no model.pt
    lambda meta: {**meta, "files": {**meta["files"], "model.pt": {**_manifest_entry(meta), "bytes": "123"}}},
    lambda meta: {**meta, "files": {**meta["files"], "model.pt": {"bytes": _manifest_entry(meta)["bytes"]}}},
    lambda meta: {**meta, "files": {**meta["files"], "model.pt": {**_manifest_entry(meta), "sha256": "abc"}}},
    lambda meta: {**meta, "files": {**meta["files"], "../../meta.json": _manifest_entry(meta)}},
    lambda meta: {**meta, "model_config": "d2"},
])
def test_malformed_meta_is_rejected_like_a_corrupt_step(stage_dir, damage):
    save(stage_dir, 1)
    path = save(stage_dir, 2)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(damage(meta)))
    with pytest.warns(UserWarning, match="step_000002"):
        assert latest_step(stage_dir) == 1
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(stage_dir, step=2)


def test_a_loaded_file_must_be_in_the_manifest(stage_dir):
    path = save(stage_dir, 1)
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]["optim_rank0.pt"]  # the file is there, its hash is not: it could be anything
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="optim_rank0.pt"):
        load_checkpoint(stage_dir, step=1)
    load_checkpoint(stage_dir, step=1, load_optimizer=False)  # the model alone is covered


@pytest.mark.parametrize("stage, tag", [
    ("base", "../d2"), ("base", "/tmp/d2"), ("base", "d2/../../x"), ("base", ".."), ("base", ""),
    ("base", "d2\\x"), ("../base", "d2"), ("base", ".hidden"),
])
def test_stage_and_tag_cannot_leave_the_artifact_root(tmp_path, stage, tag):
    with pytest.raises(ValueError, match="stage|model tag"):
        checkpoint_dir(stage, tag, tmp_path)


def test_model_from_checkpoint_gives_identical_logits(stage_dir):
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    # keys as torch.compile writes them
    compiled_state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(stage_dir, 5, compiled_state, None, meta_for(5))
    loaded, meta = build_model_from_checkpoint("base", "d2")
    assert meta["step"] == 5 and loaded.config == TINY
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # saved without optimizer state: asking for it says so
    with pytest.raises(CheckpointError, match="without the optimizer"):
        load_checkpoint(stage_dir, load_optimizer=True)


def test_optimizer_shards_per_rank(stage_dir):
    world_size = 2
    model = tiny_model()
    barrier = threading.Barrier(world_size)
    errors = []

    def rank_main(rank):
        try:
            save_checkpoint(stage_dir, 3, model.state_dict() if rank == 0 else None, [{"rank": rank}],
                            meta_for(3) if rank == 0 else None, rank=rank, world_size=world_size,
                            barrier=barrier.wait)
        except BaseException as e:  # surface errors from the thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for rank in range(world_size):
        _, optim_state, meta = load_checkpoint(stage_dir, rank=rank)
        assert optim_state == [{"rank": rank}]
    assert meta["world_size"] == 2 and set(meta["files"]) == {"model.pt", "optim_rank0.pt", "optim_rank1.pt"}
    with pytest.raises(CheckpointError, match="same number of ranks"):
        load_checkpoint(stage_dir, rank=2)
    # model only: fine with any number of ranks
    assert load_checkpoint(stage_dir, rank=2, load_optimizer=False)[1] is None
    with pytest.raises(ValueError, match="barrier"):
        save(stage_dir, 4, rank=0, world_size=2)


def test_per_rank_directories_then_finalize(tmp_path):
    # what Ray Train workers do: write into their own dirs, rank 0 finalizes with the others' hashes
    model = tiny_model()
    out = tmp_path / "ray_checkpoint"
    write_checkpoint(out, model.state_dict(), [{"lr": 0.1}])
    with pytest.raises(ValueError, match="step"):
        finalize_checkpoint(out, meta_for(9))
    finalize_checkpoint(out, {**meta_for(9), "step": 9})
    assert read_checkpoint(out)[1] == [{"lr": 0.1}]
    # a missing shard is caught at finalize
    write_checkpoint(tmp_path / "bad", model.state_dict(), [{}])
    with pytest.raises(CheckpointError, match="optim_rank1"):
        finalize_checkpoint(tmp_path / "bad", {"step": 1}, world_size=2)
    # rank 1 wrote elsewhere: its hash goes into rank 0's manifest; the merged dir verifies
    rank1 = tmp_path / "rank1"
    write_checkpoint(rank1, None, [{"lr": 0.2}], rank=1)
    merged = tmp_path / "merged"
    write_checkpoint(merged, model.state_dict(), [{"lr": 0.1}])
    finalize_checkpoint(merged, {"step": 3}, world_size=2,
                        other_files={"optim_rank1.pt": describe_file(rank1 / "optim_rank1.pt")})
    with pytest.raises(CheckpointError, match="optim_rank1.pt is missing"):
        read_checkpoint(merged, rank=1)
    (rank1 / "optim_rank1.pt").rename(merged / "optim_rank1.pt")
    assert read_checkpoint(merged, rank=1)[1] == [{"lr": 0.2}]


def test_concurrent_atomic_writers_never_share_a_temp_file(tmp_path, monkeypatch):
    import os

    from nanochat_ray import common

    # both writers reach their sync at the same moment, then both rename: with one shared temp
    # name the second rename finds nothing and the survivor may hold a mix of both
    barrier, real_fsync = threading.Barrier(2, timeout=10), os.fsync
    monkeypatch.setattr(common.os, "fsync", lambda fd: (barrier.wait(), real_fsync(fd)))
    target, errors = tmp_path / "meta.json", []
    payloads = [b"a" * 300_000, b"b" * 200_000]

    def write(data):
        try:
            common.write_atomic(target, data)
        except Exception as e:  # noqa: BLE001 - the test reports it below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_failed_atomic_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from nanochat_ray import common

    target = tmp_path / "LATEST"
    target.write_text("step_000001\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        common.write_atomic(target, "step_000002\n")
    with pytest.raises(ZeroDivisionError):
        common.write_atomic(tmp_path / "token_bytes.pt", lambda path: (path.write_bytes(b"x"), 1 / 0))
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"] and target.read_text() == "step_000001\n"
