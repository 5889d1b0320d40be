"""Dataset registry: mirror lookup, reading every format, downloads (atomic, cached, clear failures)."""

import functools
import http.server
import os
import threading
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_ray.data import registry
from nanochat_ray.data.registry import (
    DataUnavailableError, Source, download_file, read_records, resolve, shard_url,
)

# resolved, as the registry resolves it (the mirror may be reached through a symlink)
MIRROR = Path(os.environ.get("NANOCHAT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data").resolve()
needs_mirror = pytest.mark.skipif(not (MIRROR / "gsm8k").is_dir(), reason=f"no data mirror at {MIRROR}")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # downloads land in a fresh base dir, no mirror unless a test passes one, and no backoff waits
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


@pytest.fixture
def server(tmp_path):
    """A tiny HTTP server on 127.0.0.1 serving tmp_path/www; yields (root dir, base url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@needs_mirror
def test_resolve_and_read_from_mirror(monkeypatch):
    path = resolve("gsm8k", "train", data_root=MIRROR)
    assert path == MIRROR / "gsm8k" / "train.jsonl"
    rows = read_records(path)
    assert len(rows) == 7473 and set(rows[0]) == {"question", "answer"}
    # NANOCHAT_DATA works as well as the argument
    monkeypatch.setenv("NANOCHAT_DATA", str(MIRROR))
    assert resolve("ARC-Challenge", "test") == MIRROR / "arc" / "ARC-Challenge" / "test.jsonl"
    assert resolve("core_eval_bundle", "all").joinpath("core.yaml").is_file()

    humaneval = read_records(resolve("humaneval", "test"))  # .jsonl.gz
    assert len(humaneval) == 164 and humaneval[0]["task_id"] == "HumanEval/0"
    identity = read_records(MIRROR / "identity" / "identity.json")  # .json list
    assert len(identity) == 91 and "instruction" in identity[0]

    val = read_records(MIRROR / "pretrain_text" / "shard_00004.parquet")  # parquet; the last shard is validation
    assert len(val) == 453 and isinstance(val[0]["text"], str)


def test_read_formats_and_directories(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    # nanochat's identity file: each line a bare list of messages
    (tmp_path / "b.jsonl").write_text('[{"role": "user", "content": "hi"}]\n')
    write_parquet(tmp_path / "c.parquet", [{"x": 3}])
    (tmp_path / ".c.parquet.tmp.part").write_text("ignored")
    assert read_records(tmp_path / "b.jsonl") == [{"messages": [{"role": "user", "content": "hi"}]}]
    assert [r.get("x") for r in read_records(tmp_path)] == [1, 2, None, 3]
    with pytest.raises(ValueError, match="format"):
        read_records(tmp_path / "words.txt")


def test_no_mirror_and_no_network_is_a_clear_error(monkeypatch):
    url = "http://127.0.0.1:9/x"  # discard port: connection refused
    monkeypatch.setitem(registry.SOURCES["gsm8k"], "train", Source((url,), "gsm8k/train.jsonl"))
    with pytest.raises(DataUnavailableError) as info:
        resolve("gsm8k", "train")
    message = str(info.value)
    assert "gsm8k" in message and url in message and "NANOCHAT_DATA" in message and "--data-root" in message
    assert "attempts: 5" in message and "No local mirror" in message
    assert not [p for p in registry.cache_dir("gsm8k").rglob("*") if p.is_file()]  # no partial file


@needs_mirror
def test_split_the_mirror_lacks(monkeypatch):
    unreachable = Source(("http://127.0.0.1:9/train.parquet",), None)
    monkeypatch.setitem(registry.SOURCES["ARC-Easy"], "train", unreachable)
    with pytest.raises(DataUnavailableError, match="lacks this split"):
        resolve("ARC-Easy", "train", data_root=MIRROR)
    with pytest.raises(ValueError, match="unknown dataset/split"):
        resolve("ARC-Easy", "dev")


def test_download_is_cached_and_atomic(server, monkeypatch):
    root, base = server
    write_parquet(root / "train-00000-of-00001.parquet", [{"question": "q", "answer": "a"}])
    source = Source((f"{base}/train-00000-of-00001.parquet",), None)
    monkeypatch.setitem(registry.SOURCES["gsm8k"], "train", source)
    path = resolve("gsm8k", "train")
    assert path == registry.cache_dir("gsm8k") / "train" / "train-00000-of-00001.parquet"
    assert read_records(path) == [{"question": "q", "answer": "a"}]
    (root / "train-00000-of-00001.parquet").unlink()
    assert resolve("gsm8k", "train") == path  # cached: no second download

    # an error page saved under a parquet name fails validation: nothing at dest, no temp file
    (root / "bad.parquet").write_text("<html>rate limited</html>")
    dest = path.parent / "bad.parquet"
    with pytest.raises(DataUnavailableError, match="bad.parquet"):
        download_file(f"{base}/bad.parquet", dest, retries=2)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    # a 404 is not retried
    with pytest.raises(DataUnavailableError, match="attempts: 1;.*404"):
        download_file(f"{base}/missing.parquet", dest)
    # file:// works too (e.g. a mirror on a mounted volume)
    (root / "words.txt").write_text("aa\nab\n")
    assert download_file((root / "words.txt").as_uri(), path.parent / "words.txt").read_text() == "aa\nab\n"


def test_split_in_parts_and_zip_archive(server, monkeypatch):
    root, base = server
    for i in range(2):
        write_parquet(root / f"train-{i:05d}-of-00002.parquet", [{"messages": [], "i": i}])
    urls = tuple(f"{base}/train-{i:05d}-of-00002.parquet" for i in range(2))
    monkeypatch.setitem(registry.SOURCES["smoltalk"], "train", Source(urls, None))
    path = resolve("smoltalk", "train")
    assert path.is_dir() and [r["i"] for r in read_records(path)] == [0, 1]

    with zipfile.ZipFile(root / "eval_bundle.zip", "w") as zf:
        zf.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
    monkeypatch.setitem(registry.SOURCES["core_eval_bundle"], "all",
                        Source((f"{base}/eval_bundle.zip",), None, unzip=True))
    bundle = resolve("core_eval_bundle", "all")
    assert (bundle / "core.yaml").read_text() == "icl_tasks: []\n"
    assert [p.name for p in bundle.parent.iterdir()] == ["all"]  # archive and temp dir removed


def test_shard_urls():
    assert shard_url(1822).endswith("/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_01822.parquet")
    with pytest.raises(ValueError):
        shard_url(1823)


# -----------------------------------------------------------------------------
# pinned and verified downloads, against a fake hub on 127.0.0.1

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch):
    """A fake hub: branch head COMMIT, paths-info from `meta`, file bytes from `files` (the test
    makes them disagree); paths under /cut/ announce 100 bytes more than they send (/raw/: no
    Content-Length). Yields (base url, files, meta, log of GET paths)."""
    import hashlib
    import json as json_
    import urllib.parse

    files, meta, log = {}, {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, length: int | None = None):
            self.send_response(200)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            log.append(self.path)
            if self.path.endswith("/revision/main"):
                return self._send(json_.dumps({"sha": COMMIT}).encode())
            if self.path.startswith(("/cut/", "/raw/")):
                body = files[self.path[5:]]
                return self._send(body, len(body) + 100 if self.path.startswith("/cut/") else None)
            prefix = f"/datasets/openai/gsm8k/resolve/{COMMIT}/"
            if self.path.startswith(prefix) and self.path[len(prefix):] in files:
                return self._send(files[self.path[len(prefix):]], len(files[self.path[len(prefix):]]))
            self.send_error(404)

        def do_POST(self):
            path = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())["paths"][0]
            assert self.path == f"/api/datasets/openai/gsm8k/paths-info/{COMMIT}"
            data = meta[path]
            info = {"type": "file", "path": path, "size": len(data), "oid": "0" * 40,
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}}
            self._send(json_.dumps([info]).encode())

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setattr(registry, "HUB", base, raising=False)
    yield base, files, meta, log
    httpd.shutdown()
    httpd.server_close()


def _parquet_bytes(rows: list[dict]) -> bytes:
    import io

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def test_hub_files_come_from_one_pinned_commit_and_are_verified(hub, monkeypatch):
    import json as json_

    base, files, meta, log = hub
    good, other = _parquet_bytes([{"question": "q", "answer": "a"}]), _parquet_bytes([{"question": "x", "answer": "y"}])
    files["main/train.parquet"] = meta["main/train.parquet"] = good
    files["main/test.parquet"], meta["main/test.parquet"] = other, good  # the hub's record says otherwise
    for split in ("train", "test"):
        monkeypatch.setitem(registry.SOURCES["gsm8k"], split,
                            Source((f"{base}/datasets/openai/gsm8k/resolve/main/main/{split}.parquet",), None))

    assert read_records(resolve("gsm8k", "train")) == [{"question": "q", "answer": "a"}]
    assert f"/datasets/openai/gsm8k/resolve/{COMMIT}/main/train.parquet" in log  # the commit, not the branch
    pins = json_.loads((registry.cache_dir("gsm8k").parent / "pins.json").read_text())
    assert pins["revisions"] == {"openai/gsm8k": COMMIT}

    with pytest.raises(DataUnavailableError, match=r"attempts: 1;.*test.parquet.*sha256.*not the pinned file"):
        resolve("gsm8k", "test")
    assert list((registry.cache_dir("gsm8k") / "test").iterdir()) == []  # the file was not kept


@pytest.mark.parametrize("name", ["words.txt", "rows.jsonl", "rows.json", "rows.jsonl.gz", "bundle.zip",
                                  "shard.parquet"])
def test_a_truncated_download_is_detected_for_every_type(hub, tmp_path, name):
    import gzip
    import io
    import json as json_

    base, files, _, _ = hub
    rows = [{"text": f"row {i} " * 20} for i in range(200)]
    jsonl = "".join(json_.dumps(r) + "\n" for r in rows).encode()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", "x" * 5000)
    files[name] = {"words.txt": b"aa\r\nab\r\n" * 500, "rows.jsonl": jsonl, "rows.json": json_.dumps(rows).encode(),
                   "rows.jsonl.gz": gzip.compress(jsonl), "bundle.zip": archive.getvalue(),
                   "shard.parquet": _parquet_bytes(rows)}[name]
    dest = tmp_path / "dl" / name
    with pytest.raises(DataUnavailableError, match="truncated transfer"):  # fewer bytes than announced
        download_file(f"{base}/cut/{name}", dest, retries=1)
    if name != "words.txt":  # no length announced and cut mid-file: each type's reader notices
        whole = files[name]
        files[name] = whole[:len(whole) * 2 // 3]
        with pytest.raises(DataUnavailableError):
            download_file(f"{base}/raw/{name}", dest, retries=1)
        files[name] = whole
    assert not dest.exists() and not list(dest.parent.iterdir())
    assert download_file(f"{base}/raw/{name}", dest, retries=1).read_bytes() == files[name]


def test_other_files_are_held_to_their_recorded_size_and_sha256(hub, tmp_path):
    base, files, _, _ = hub
    files["words.txt"] = b"aa\r\nab\r\n"
    url, dest = f"{base}/raw/words.txt", tmp_path / "words.txt"
    download_file(url, dest)  # the first download's size and sha256 are recorded...
    dest.unlink()
    files["words.txt"] = b"aa\r\nzz\r\n"
    with pytest.raises(DataUnavailableError, match="words.txt: 8 bytes with sha256 .* are recorded for it"):
        download_file(url, dest)  # ...and a later one must match them
    assert not dest.exists()
    with pytest.raises(DataUnavailableError, match="1 bytes with sha256 " + "0" * 64):
        download_file(f"{base}/raw/words.txt", tmp_path / "w2.txt", expected=(1, "0" * 64))
