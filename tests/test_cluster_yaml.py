"""cluster.yaml: valid for `ray up` by Ray's own schema, and the properties a GPU run relies on."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def prepared(raw: dict) -> dict:
    """What `ray up` does before launching anything: fill Ray's AWS defaults, merge the common setup
    commands into the head's and the workers', then check the result against ray-schema.json."""
    config = prepare_config(copy.deepcopy(raw))
    try:
        validate_config(config)
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path)) or "(top level)"
        pytest.fail(f"cluster.yaml breaks Ray's cluster schema at {where}: {e.message}")
    return config


@pytest.fixture(scope="module")
def raw() -> dict:
    try:
        return yaml.safe_load(CLUSTER_YAML.read_text())
    except yaml.YAMLError as e:
        pytest.fail(f"cluster.yaml is not valid YAML: {e}")


@pytest.fixture(scope="module")
def config(raw) -> dict:
    return prepared(raw)


def gpu_node_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def test_schema_rejects_a_broken_config(raw):
    # the validation above is not vacuous: a misspelt field or a wrong type fails
    misspelt = copy.deepcopy(raw) | {"max_worker": 2}
    wrong_type = copy.deepcopy(raw)
    wrong_type["available_node_types"]["head"]["resources"] = "16 CPUs"
    for broken in (misspelt, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(broken))


def test_cpu_head_and_8_gpu_workers(config):
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not hold GPUs: training takes whole 8-GPU nodes"
    gpu_types = gpu_node_types(config)
    assert len(gpu_types) == 1, f"expected one GPU worker type, got {sorted(gpu_types)}"
    (worker,) = gpu_types.values()
    assert worker["resources"]["GPU"] == 8 and worker["node_config"]["InstanceType"] == "p5.48xlarge"
    assert 1 <= worker["max_workers"] <= config["max_workers"]
    assert 0 <= worker["min_workers"] <= worker["max_workers"]


def test_every_node_installs_this_project_with_the_tested_versions(config):
    # the same Ray everywhere (nodes and the submitting CLI), and the versions the tests ran with
    torch_version = torch.__version__.split("+")[0]
    assert config["file_mounts"].get("~/nanochat-ray") == ".", "the checkout must be synced to ~/nanochat-ray"
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = "\n".join(config[role])
        assert re.search(r"pip install .*-e ~/nanochat-ray", commands), f"{role} do not install the project"
        assert f"torch=={torch_version}" in commands, f"{role} do not pin torch=={torch_version}"
        assert re.search(rf"ray\[[a-z,]+\]=={re.escape(ray.__version__)}", commands), \
            f"{role} do not pin ray=={ray.__version__}"
    # the workers' torch is PyPI's CUDA build, not the CPU wheel the head takes
    assert "whl/cpu" not in "\n".join(config["worker_setup_commands"])


def test_artifact_root_is_shared_storage_on_every_node(config):
    common = "\n".join(config["setup_commands"])  # run on the head and on every worker, before `ray start`
    base = re.search(r"NANOCHAT_BASE_DIR=(\S+)", common)
    assert base, "setup_commands must export NANOCHAT_BASE_DIR"
    # mount -t TYPE [options] SERVER:/PATH MOUNTPOINT
    mounts = re.findall(r"mount -t (nfs4|lustre) [^\n]*?\S+:/\S* (/[^\s)]+)", common)
    assert mounts, "setup_commands must mount shared storage (EFS over nfs4, or FSx for Lustre)"
    assert any(Path(base.group(1)).is_relative_to(point) for _, point in mounts), \
        f"NANOCHAT_BASE_DIR={base.group(1)} is not under a shared mount {[p for _, p in mounts]}"


def test_dashboard_listens_on_the_head_only(config):
    # reached through `ray dashboard cluster.yaml` (an SSH tunnel), never exposed to the network
    start = "\n".join(config["head_start_ray_commands"])
    assert "--head" in start and "0.0.0.0" not in start
