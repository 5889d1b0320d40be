"""More than one node: workers placed over nodes, a node lost mid-run, storage every node must see.

The node-loss run builds its own ray.cluster_utils.Cluster (several raylets on this machine) in a
subprocess (tests/cluster_scenario.py) with its own Ray temp dir, so it neither joins nor disturbs
the suite's shared local Ray (conftest's ray_cluster), whichever test ran before it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat_ray.checkpoint import checkpoint_dir
from nanochat_ray.config import make_config
from nanochat_ray.train import worker
from nanochat_ray.train.pretrain import pretrain
from nanochat_ray.stage import METRICS_LOG, RunOptions

SCENARIO = Path(__file__).with_name("cluster_scenario.py")
STEPS = 16  # smoke preset, a checkpoint every 4 steps


@pytest.fixture(scope="module")
def shards(data_root):
    pretrain_text = sorted((data_root / "pretrain_text").glob("shard_*.parquet"))
    return pretrain_text[0], pretrain_text[-1]


@pytest.fixture(scope="module")
def node_loss(shards, smoke_tokenizer_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("node_loss")
    ray_tmp = Path(f"/tmp/ncmn{os.getpid()}")  # short: Ray's socket paths have a length limit
    result = tmp / "result.json"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(SCENARIO.parents[1])}
    env.pop("RAY_ADDRESS", None)
    try:
        run = subprocess.run([sys.executable, str(SCENARIO), str(result), str(tmp / "artifacts"),
                              str(smoke_tokenizer_dir), str(shards[0]), str(shards[1]), str(STEPS)],
                             env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(result.read_text())


def test_workers_spread_over_nodes_and_survive_losing_one(node_loss):
    r = node_loss
    first, after = r["placements"]
    assert first == sorted([r["node_a"], r["node_b"]]), "STRICT_SPREAD: one worker on each of nodes A and B"
    assert after == sorted([r["node_b"], r["node_c"]]), "after A was lost: on B and the node added since"
    assert r["waited_without_resources"], "training went on with one node, against STRICT_SPREAD"
    # every step once, in order: the steps after the checkpoint ran again and replaced the lost ones
    assert r["steps"] == list(range(1, STEPS + 1))
    # the loss curve continues: the steps run again from the checkpoint (the same weights and the
    # same rows, from a feeder restarted at the saved position) give the losses of the first try
    before = {int(step): loss for step, loss in r["before_loss"].items()}
    again = [step for step in before if step > r["checkpoint_at_loss"]]
    assert again, "no step ran between the checkpoint and the node loss"
    for step in again:
        assert r["loss"][str(step)] == pytest.approx(before[step], rel=1e-3), (step, r["loss"], before)
    assert r["loss"][str(STEPS)] < r["loss"]["1"] - 0.5, "it learns"


def test_a_worker_that_cannot_see_the_artifact_root_fails_at_start(ray_cluster, shards, smoke_tokenizer_dir,
                                                                   tmp_path, monkeypatch):
    # the driver's marker lands on storage the workers do not see (as on a node without the shared mount)
    monkeypatch.setattr(worker, "write_storage_marker", lambda stage_dir: tmp_path / "driver-only" / "marker")
    with pytest.raises(Exception, match="is not the storage the driver writes to") as failure:
        pretrain(make_config("smoke"), RunOptions(tokenizer_dir=smoke_tokenizer_dir, artifact_root=tmp_path,
                                                  data_actor_cpus=0.0, max_failures=0),
                 train_shards=[shards[0]], val_shard=shards[1])
    assert "NANOCHAT_BASE_DIR" in str(failure.value)
    assert not (checkpoint_dir("base", "d2", tmp_path) / METRICS_LOG).exists(), "a step ran before the check"
