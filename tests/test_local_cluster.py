"""cluster-local.yaml and its node provider (bench/local_cluster.py), without starting Ray: the yaml is
valid for `ray up` and mirrors cluster.yaml's node types; a node's `ray stop` stops that node's
processes and nothing else on the machine. The whole `ray up` → job → `ray down` run is
`python bench/local_cluster.py` (minutes: README "Cluster").
"""

import copy
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "bench" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(spec)
spec.loader.exec_module(local_cluster)


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_local_yaml_is_valid_and_has_cluster_yaml_node_types():
    raw = load("cluster-local.yaml")
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before it launches anything
    validate_config(config)
    assert set(config["available_node_types"]) == set(load("cluster.yaml")["available_node_types"])
    module, _, name = raw["provider"]["module"].rpartition(".")
    assert module == "bench.local_cluster" and getattr(local_cluster, name) is local_cluster.LocalNodeProvider
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "a job's CPUs must come from nodes the autoscaler adds"
    for name, node_type in config["available_node_types"].items():
        assert node_type["resources"].get("GPU", 0) == 0, f"{name}: CPU only"
        if name != config["head_node_type"]:
            assert node_type["min_workers"] == 0 and 2 <= node_type["max_workers"] <= config["max_workers"]
    start = "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "ray stop" not in start, "`ray stop` on this machine would stop every Ray of every user"


def test_ray_stop_on_a_node_stops_that_node_only(tmp_path, monkeypatch):
    # the nodes' PATH starts at sys.executable's directory: a `ray` there that only leaves a trace, so
    # a runner that let `ray stop` through fails this test instead of stopping every Ray on the machine
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'ray-ran'}\n")
    (bin_dir / "ray").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    nodes = tmp_path / "nodes"
    provider = local_cluster.LocalNodeProvider({"root": str(nodes)}, "test")
    tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: "gpu_8xh100"}
    provider.create_node({}, tags, 2)
    a, b = sorted(provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "gpu_8xh100"}))
    assert (a, b) == ("gpu_8xh100-1", "gpu_8xh100-2")
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "head"}) == []
    runner_a, runner_b = (provider.get_command_runner("", node, {}, "test", subprocess, True) for node in (a, b))
    bystander = subprocess.Popen(["sleep", "60"])  # another program on the machine (say, another Ray)
    try:
        for runner in (runner_a, runner_b):  # a daemon on each node, as `ray start` leaves behind
            runner.run("sleep 60 > /dev/null 2>&1 &")
        assert runner_a.run("echo $HOME", with_output=True).decode().strip() == str(nodes / a)
        runner_a.run_rsync_up(__file__, "~/conf/bootstrap.py")
        assert (nodes / a / "conf" / "bootstrap.py").read_text() == Path(__file__).read_text()
        assert len(local_cluster.marked_processes(nodes / a)) == 1
        assert len(local_cluster.marked_processes(nodes)) == 2  # the root: every node

        with pytest.raises(ValueError, match="ray stop` inside a longer command"):
            runner_b.run("ulimit -n 65536; ray stop")  # cannot be split safely: refused
        runner_a.run("ray stop")  # what `ray down` sends to the head
        assert not (tmp_path / "ray-ran").exists(), "`ray stop` reached the machine"
        assert local_cluster.marked_processes(nodes / a) == []
        assert len(local_cluster.marked_processes(nodes / b)) == 1 and bystander.poll() is None

        provider.terminate_node(b)
        assert local_cluster.marked_processes(nodes) == [] and provider.non_terminated_nodes({}) == [a]
        time.sleep(0.1)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        local_cluster.stop_processes(nodes)
