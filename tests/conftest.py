"""Session-wide fixtures: the shared data mirror, one small tokenizer, one local Ray cluster."""

import os
from pathlib import Path

import pytest

DATA_ROOT = Path(os.environ.get("NANOCHAT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "pretrain_text").is_dir():
        pytest.fail(f"no data mirror at {DATA_ROOT}: set NANOCHAT_DATA to a copy of shared/data")
    return DATA_ROOT


@pytest.fixture(scope="session", autouse=True)
def artifact_root(tmp_path_factory) -> Path:
    """Every test writes artifacts under one temp root, never into ~/.cache."""
    root = tmp_path_factory.mktemp("artifacts")
    os.environ["NANOCHAT_BASE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def smoke_tokenizer_dir(data_root, tmp_path_factory) -> Path:
    """A 1,024-token tokenizer (the smoke preset's vocab) trained on 2M characters of shard 0."""
    import pyarrow.parquet as pq

    from nanochat_ray.tokenizer import Tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    texts = pq.read_table(data_root / "pretrain_text" / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    Tokenizer.train_from_iterator(texts, vocab_size=1024, max_chars=2_000_000).save(directory)
    return directory


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: start-up costs seconds."""
    import ray

    # logical CPUs: trainers, data actors and tasks share 2 real cores in CI. address="local":
    # a new instance even when `ray start` has left a cluster behind for ray.init() to join.
    # metrics_report_interval_ms: processes push custom metrics every second, not every 10 s, so a
    # short test run's gauges reach the metrics endpoint while it lives (tests/test_metrics.py)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": os.environ["NANOCHAT_BASE_DIR"]}},
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()
