"""Shard downloads: from a local HTTP server through Ray tasks (atomic, bounded, skipping what is
there, clear failures), and the mirror path (nothing downloaded, val = last file)."""

import http.server
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_ray.config import make_config
from nanochat_ray.data.download import shard_paths, shards_needed, start_downloads, train_and_val_shards
from nanochat_ray.data.registry import NUM_SHARDS, DataUnavailableError, cache_dir


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # shards land in a fresh base dir (the driver passes absolute paths to the tasks); no mirror
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)


@pytest.fixture
def server(tmp_path):
    """HTTP server on 127.0.0.1 serving tmp_path/www, each GET held 0.2 s so that overlapping
    downloads show; yields (root dir, url_for(index), stats with the peak of concurrent GETs)."""
    root = tmp_path / "www"
    root.mkdir()
    stats, lock = {"requests": 0, "active": 0, "peak": 0}, threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            with lock:
                stats["requests"] += 1
                stats["active"] += 1
                stats["peak"] = max(stats["peak"], stats["active"])
            try:
                time.sleep(0.2)
                super().do_GET()
            finally:
                with lock:
                    stats["active"] -= 1

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield root, lambda i: f"{base}/shard_{i:05d}.parquet", stats
    httpd.shutdown()
    httpd.server_close()


def write_shard(path: Path, text: str = "hello world") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"text": text}]), path)
    return path


def test_downloads_land_bounded_and_present_shards_are_skipped(ray_cluster, server):
    root, url_for, stats = server
    indices = [0, 1, 2, 3, NUM_SHARDS - 1]
    for i in indices:
        write_shard(root / f"shard_{i:05d}.parquet", f"doc {i}")

    downloads = start_downloads(5, max_concurrency=2, url_for=url_for)
    downloads.wait()
    train, val = train_and_val_shards(downloads.paths)
    assert [p.name for p in train] == [f"shard_{i:05d}.parquet" for i in range(4)]
    assert val.name == "shard_01822.parquet"
    assert [pq.read_table(p).column("text")[0].as_py() for p in downloads.paths] == [f"doc {i}" for i in indices]
    assert sorted(p.name for p in cache_dir("pretrain").iterdir()) == sorted(p.name for p in downloads.paths)
    assert stats["requests"] == 5 and stats["peak"] <= 2

    start_downloads(5, url_for=url_for).wait()  # everything present: no request at all
    assert stats["requests"] == 5


def test_damaged_shard_is_fetched_again_and_bad_download_names_shard_and_url(ray_cluster, server):
    root, url_for, stats = server
    write_shard(root / "shard_00000.parquet", "good")
    (root / "shard_01822.parquet").write_text("<html>rate limited</html>")
    truncated = write_shard(cache_dir("pretrain") / "shard_00000.parquet", "x" * 1000)
    truncated.write_bytes(truncated.read_bytes()[:-20])  # footer gone, as after an interrupted copy

    downloads = start_downloads(2, url_for=url_for, retries=1)
    train, val = train_and_val_shards(downloads.paths)
    downloads.wait(train)  # only what was asked for: fine although the val shard fails
    assert pq.read_table(train[0]).column("text")[0].as_py() == "good"
    with pytest.raises(DataUnavailableError) as info:
        downloads.wait()
    message = str(info.value)
    assert "shard_01822.parquet" in message and url_for(NUM_SHARDS - 1) in message
    assert not val.exists() and not list(val.parent.glob(".*.part"))  # no half file


def test_mirror_shards_are_used_in_place(data_root, tmp_path, capsys):
    paths = shard_paths(240, data_root)
    assert "using all 5" in capsys.readouterr().out
    train, val = train_and_val_shards(paths)
    assert len(train) == 4 and val == (data_root / "pretrain_text" / "shard_00004.parquet").resolve()
    assert [p.name for p in shard_paths(3, data_root)] == ["shard_00000.parquet", "shard_00001.parquet",
                                                           "shard_00004.parquet"]
    # nothing to download, so no Ray task runs (and none is needed)
    downloads = start_downloads(240, data_root)
    downloads.wait()
    assert downloads.paths == paths and not cache_dir("pretrain").exists()

    mirror = tmp_path / "mirror"
    write_shard(mirror / "pretrain_text" / "shard_00000.parquet")
    (mirror / "pretrain_text" / "shard_00001.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataUnavailableError, match="shard_00001.parquet is missing or not a readable parquet"):
        start_downloads(2, mirror).wait()


def test_hub_layout_and_shards_needed():
    assert [p.name for p in shard_paths(3)] == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    with pytest.raises(ValueError, match="num_shards"):
        shard_paths(1)
    with pytest.raises(ValueError, match="num_shards"):
        shard_paths(NUM_SHARDS + 1)
    # d20: 11.2B tokens × 4.8 chars / 250M chars per shard = 216 shards, +10%, + val (SPEC: ~240)
    assert shards_needed(make_config("d20")) == 239
    assert shards_needed(make_config("cpu")) == 9  # the tokenizer's 2B characters: 8 shards
    assert shards_needed(make_config("smoke")) == 3
