"""
Every dataset of the pipeline (SPEC §1): where the reference downloads it, and where it sits in a
local mirror laid out like shared/data (for machines without hub access).

    path = resolve("gsm8k", "train")          # mirror file, else cached download
    rows = read_records(path)                 # list of dicts, whatever the file format

The mirror root is the `data_root` argument (a job's --data-root), else NANOCHAT_DATA, else none.
Downloads go to base_dir()/data/<dataset>/<split>/ through a temp file renamed on success, with
retries and exponential backoff. Pretraining shards: shard_url(i); data/download.py fetches
many of them in parallel with Ray tasks on top of download_file.

Every download is pinned and verified before it is used:
- hub files come from one commit per repo: HUB_REVISIONS, or (where no commit is recorded there)
  the branch head resolved at the repo's first download and kept in base_dir()/data/pins.json;
  their size and sha256 come from the hub's own metadata for that commit (paths-info API);
- other files are checked against Source.expected where recorded, else against the size and
  sha256 of their first download, kept in pins.json;
- every file must arrive whole (the Content-Length, and a check per type: parquet, zip, gzip,
  json, jsonl). A mismatch names the file and what differed, and the file is not kept.
"""

import gzip
import hashlib
import json
import os
import shutil
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat_ray.common import base_dir, write_atomic

HUB = os.environ.get("HF_ENDPOINT", "https://huggingface.co")  # HF_ENDPOINT: a hub mirror
HF = f"{HUB}/datasets"
S3 = "https://karpathy-public.s3.us-west-2.amazonaws.com"  # nanochat's own downloads
MIRROR_HINT = ("Point at a local mirror laid out like shared/data with --data-root DIR "
               "or NANOCHAT_DATA=DIR.")


class DataUnavailableError(RuntimeError):
    """A dataset is neither in the mirror, nor cached, nor downloadable."""


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]  # where the reference gets it; several = one split in parts
    mirror: str | None  # path under the mirror root; None = the mirror has no copy
    unzip: bool = False  # the url is a zip archive whose contents are the dataset (a directory)
    # (bytes, sha256) per url, for files outside the hub; None = not known when this was written
    # (no network), so the first download's are recorded and enforced from then on
    expected: tuple[tuple[int, str] | None, ...] = ()


# The commit each hub repo is read at. None: not known when this was written (the machines had no
# hub access); the branch head is resolved at the first download and kept in pins.json. Write a
# commit here to pin every machine to the same data.
HUB_REVISIONS: dict[str, str | None] = {
    "openai/gsm8k": None, "cais/mmlu": None, "allenai/ai2_arc": None, "openai/openai_humaneval": None,
    "HuggingFaceTB/smol-smoltalk": None, "karpathy/fineweb-edu-100b-shuffle": None,
}


def _hf(repo: str, *files: str) -> tuple[str, ...]:
    # parquet files of a hub dataset, as its "resolve" download URLs
    return tuple(f"{HF}/{repo}/resolve/main/{f}" for f in files)


def _arc(subset: str) -> dict[str, Source]:
    repo = "allenai/ai2_arc"
    return {
        "train": Source(_hf(repo, f"{subset}/train-00000-of-00001.parquet"), None),
        "validation": Source(_hf(repo, f"{subset}/validation-00000-of-00001.parquet"),
                             f"arc/{subset}/validation.jsonl"),
        "test": Source(_hf(repo, f"{subset}/test-00000-of-00001.parquet"), f"arc/{subset}/test.jsonl"),
    }


SOURCES: dict[str, dict[str, Source]] = {
    "gsm8k": {  # openai/gsm8k, config "main"
        "train": Source(_hf("openai/gsm8k", "main/train-00000-of-00001.parquet"), "gsm8k/train.jsonl"),
        "test": Source(_hf("openai/gsm8k", "main/test-00000-of-00001.parquet"), "gsm8k/test.jsonl"),
    },
    "mmlu": {  # cais/mmlu, config "all"
        "dev": Source(_hf("cais/mmlu", "all/dev-00000-of-00001.parquet"), "mmlu/dev.jsonl"),
        "validation": Source(_hf("cais/mmlu", "all/validation-00000-of-00001.parquet"),
                             "mmlu/validation.jsonl"),
        "test": Source(_hf("cais/mmlu", "all/test-00000-of-00001.parquet"), "mmlu/test.jsonl"),
        # config "auxiliary_train": its parquet nests each row in a single column named "train"
        "auxiliary_train": Source(_hf("cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet"), None),
    },
    "ARC-Easy": _arc("ARC-Easy"),
    "ARC-Challenge": _arc("ARC-Challenge"),
    "humaneval": {  # openai/openai_humaneval; the mirror has OpenAI's original file, same fields
        "test": Source(_hf("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"),
                       "humaneval/HumanEval.jsonl.gz"),
    },
    "smoltalk": {  # HuggingFaceTB/smol-smoltalk; the mirror's train is a small stand-in (LIMA + Alpaca)
        "train": Source(_hf("HuggingFaceTB/smol-smoltalk",
                            *(f"data/train-{i:05d}-of-00004.parquet" for i in range(4))),
                        "sft/sft_messages.jsonl"),
        "test": Source(_hf("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet"), None),
    },
    "identity": {  # synthetic "who are you" conversations; the mirror has FastChat's as a stand-in
        "all": Source((f"{S3}/identity_conversations.jsonl",), "identity/dummy_conversation_messages.jsonl"),
    },
    "words": {  # English word list for the spelling tasks, at the commit the mirror's copy comes from
        "all": Source(("https://raw.githubusercontent.com/dwyl/english-words/"
                       "20f5cc9b3f0ccc8ce45d814c532b7c2031bba31c/words_alpha.txt",), "words/words_alpha.txt"),
    },
    "core_eval_bundle": {  # DCLM eval data for CORE: core.yaml, eval_meta_data.csv, eval_data/
        "all": Source((f"{S3}/eval_bundle.zip",), "core_eval_bundle", unzip=True),
    },
}

# FineWeb-Edu pretraining text, re-packaged as parquet shards (column "text"); the last is validation
NUM_SHARDS = 1823
SHARD_REPO = "karpathy/fineweb-edu-100b-shuffle"


def shard_url(index: int) -> str:
    if not 0 <= index < NUM_SHARDS:
        raise ValueError(f"shard index {index} outside 0..{NUM_SHARDS - 1}")
    return f"{HF}/{SHARD_REPO}/resolve/main/shard_{index:05d}.parquet"


# -----------------------------------------------------------------------------
# finding files


def mirror_root(data_root: str | Path | None = None) -> Path | None:
    """The local mirror: `data_root`, else $NANOCHAT_DATA, else None."""
    root = data_root or os.environ.get("NANOCHAT_DATA")
    # absolute: Ray workers and tasks run in other working directories
    return Path(root).resolve() if root else None


def cache_dir(dataset: str) -> Path:
    """Where downloads of one dataset are kept."""
    return base_dir() / "data" / dataset


def resolve(dataset: str, split: str, data_root: str | Path | None = None) -> Path:
    """A local path for one split: the mirror's copy if there is one, else a cached download
    (downloaded now if needed). A file, or a directory for split-in-parts and unzipped sources."""
    if dataset not in SOURCES or split not in SOURCES[dataset]:
        known = {name: sorted(splits) for name, splits in SOURCES.items()}
        raise ValueError(f"unknown dataset/split {dataset}/{split}; known: {known}")
    source = SOURCES[dataset][split]
    root = mirror_root(data_root)
    if root is not None and source.mirror is not None and (root / source.mirror).exists():
        return root / source.mirror

    split_dir = cache_dir(dataset) / split
    single = len(source.urls) == 1 and not source.unzip
    dest = split_dir / _basename(source.urls[0]) if single else split_dir
    if dest.exists():
        return dest
    expected = dict(zip(source.urls, source.expected))
    try:
        if single:
            download_file(source.urls[0], dest, expected=expected.get(source.urls[0]))
        elif source.unzip:
            _download_unzip(source.urls[0], dest, expected.get(source.urls[0]))
        else:
            _download_parts(source.urls, dest, expected)
    except DataUnavailableError as e:
        if root is None:
            where = "No local mirror is set."
        elif source.mirror is None:
            where = f"The mirror at {root} lacks this split (no offline copy of it exists)."
        else:
            where = f"The mirror at {root} has no {source.mirror}."
        raise DataUnavailableError(f"dataset {dataset!r} split {split!r} is unavailable: {e} "
                                   f"{where} {MIRROR_HINT}") from e
    return dest


# -----------------------------------------------------------------------------
# downloading


def _basename(url: str) -> str:
    return url.split("?")[0].rsplit("/", 1)[-1]


_UNRESOLVED_HOSTS: set[str] = set()  # hosts whose name did not resolve on every attempt


def download_file(url: str, dest: str | Path, retries: int = 5, timeout: float = 60.0,
                  expected: tuple[int, str] | None = None) -> Path:
    """Download `url` to `dest`: into a temp file beside it, verified (see the module docstring:
    pinned revision, size and sha256, whole transfer, readable as its type), then renamed.
    `expected` is (bytes, sha256) when the caller knows them. Retries with exponential backoff;
    raises DataUnavailableError naming the URL and the last error."""
    if retries < 1:
        raise ValueError("retries counts attempts and must be at least 1")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    host = urllib.parse.urlsplit(url).hostname
    if host in _UNRESOLVED_HOSTS:
        # an offline machine would otherwise wait out the whole backoff again for every file
        raise DataUnavailableError(f"could not download {url}: its host {host} did not resolve earlier in this "
                                   f"process (no network?)")
    try:
        url, expected, record = _pin(url, expected, timeout)
    except (OSError, ValueError, KeyError) as e:  # no network, or the hub said something unexpected
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
            _UNRESOLVED_HOSTS.add(host)
        raise DataUnavailableError(f"could not pin {url} to a revision and its size and sha256: {e!r}") from e
    for attempt in range(1, retries + 1):
        # a unique hidden temp name: parallel downloaders never share one, shard globs skip it
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                declared = _fetch(url, f, timeout, dest.name)
            got = _validate(Path(tmp), dest.name, declared, expected)
            os.replace(tmp, dest)
            if record:
                _record_pin("files", url, {"bytes": got[0], "sha256": got[1]})
            return dest
        except Exception as e:
            error = e
            # a 4xx other than timeout / rate limit will not fix itself, nor will a verified
            # file whose bytes differ from the recorded ones
            permanent = isinstance(e, VerificationError) or (
                isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429))
            if permanent or attempt == retries:
                break
            delay = 2 ** (attempt - 1)
            print(f"download of {url} failed ({e}); retry {attempt}/{retries - 1} in {delay}s", flush=True)
            time.sleep(delay)
        finally:
            Path(tmp).unlink(missing_ok=True)
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, socket.gaierror):
        _UNRESOLVED_HOSTS.add(host)
    raise DataUnavailableError(
        f"could not download {url} (attempts: {attempt}; last error: {error!r}).") from error


def _fetch(url: str, f, timeout: float, name: str) -> int | None:
    """Stream `url` into f; returns the Content-Length the server declared (None if none: a
    compressed or close-delimited response), for the caller to compare with what arrived."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        declared = total if response.headers.get("Content-Encoding") in (None, "identity") else None
        # disable=None: no bar when stderr is not a terminal (e.g. inside Ray workers)
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return declared


class VerificationError(ValueError):
    """A downloaded file is not the one recorded for it (size or sha256)."""


def _validate(path: Path, name: str, declared: int | None, expected: tuple[int, str] | None) -> tuple[int, str]:
    """Raise naming what is wrong with a finished download; returns its (bytes, sha256).
    Catches truncated transfers (any type), error pages saved under a data file's name, and
    files that are not the recorded ones."""
    size = path.stat().st_size
    if declared is not None and size != declared:
        raise ValueError(f"{name}: truncated transfer, {size:,} of the {declared:,} bytes the server announced")
    if size == 0:
        raise ValueError(f"{name}: empty download")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    got = (size, sha.hexdigest())
    if expected is not None and got != tuple(expected):
        raise VerificationError(f"{name}: {size:,} bytes with sha256 {got[1]}, but {expected[0]:,} bytes with "
                                f"sha256 {expected[1]} are recorded for it: not the pinned file (changed "
                                f"upstream, or tampered with on the way); it was not kept. A new upstream "
                                f"version is accepted by deleting its entry in {_pins_path()} (files "
                                f"outside the hub) or by pinning a newer commit (HUB_REVISIONS)")
    _check_readable(path, name)
    return got


def _check_readable(path: Path, name: str) -> None:
    # a whole read by each type's own reader: a cut transfer without a declared length fails here
    if name.endswith(".parquet"):
        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise ValueError(f"{name}: parquet file has no rows")
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            if (bad := zf.testzip()) is not None:
                raise ValueError(f"{name}: archive member {bad} is damaged")
    elif name.endswith((".json", ".jsonl", ".gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.removesuffix(".gz").endswith(".json"):
                json.load(f)
            else:
                for line in f:
                    if line.strip():
                        json.loads(line)


# -----------------------------------------------------------------------------
# pinning: one commit per hub repo, a recorded size and sha256 per file

PINS_FILE = "pins.json"  # under cache_dir's parent: {"revisions": {repo: commit}, "files": {url: {...}}}
_pins_lock = threading.Lock()


def _pins_path() -> Path:
    return base_dir() / "data" / PINS_FILE


def _load_pins() -> dict:
    path = _pins_path()
    pins = json.loads(path.read_text()) if path.is_file() else {}
    return {"revisions": pins.get("revisions", {}), "files": pins.get("files", {})}


def _record_pin(section: str, key: str, value: str | dict) -> None:
    # threads of one process take turns; processes (parallel shard tasks) may race: the loser's
    # entry is lost, and recorded again at its next download (racing pins of one repo's branch
    # head resolve to the same commit unless it moves in those seconds)
    with _pins_lock:
        pins = _load_pins()
        pins[section][key] = value
        _pins_path().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_pins_path(), json.dumps(pins, indent=2, sort_keys=True))


def _hub_file(url: str) -> tuple[str, str, str] | None:
    """(repo, revision, path) of a hub dataset download URL, else None."""
    prefix = f"{HUB}/datasets/"
    if not url.startswith(prefix) or "/resolve/" not in url:
        return None
    repo, rest = url[len(prefix):].split("/resolve/", 1)
    revision, path = rest.split("/", 1)
    return repo, revision, path


def _api(url: str, timeout: float, form: dict | None = None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as response:
        return json.loads(response.read())


def hub_revision(repo: str, branch: str = "main", timeout: float = 60.0) -> str:
    """The commit `repo` is read at: HUB_REVISIONS, else the one recorded at its first download,
    else the branch head now (then recorded, so later downloads read the same commit)."""
    if pinned := HUB_REVISIONS.get(repo) or _load_pins()["revisions"].get(repo):
        return pinned
    commit = _api(f"{HUB}/api/datasets/{repo}/revision/{branch}", timeout)["sha"]
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"the hub answered {commit!r} for the commit of {repo}@{branch}")
    print(f"pinning {repo} to commit {commit} (the head of {branch} now; recorded in {_pins_path()})", flush=True)
    _record_pin("revisions", repo, commit)
    return commit


def _pin(url: str, expected: tuple[int, str] | None, timeout: float) -> tuple[str, tuple[int, str] | None, bool]:
    """(the URL to fetch, its expected (bytes, sha256), whether to record what arrives)."""
    if hub := _hub_file(url):
        repo, revision, path = hub
        if not re.fullmatch(r"[0-9a-f]{40}", revision):  # a branch: read the pinned commit instead
            revision = hub_revision(repo, revision, timeout)
            url = f"{HUB}/datasets/{repo}/resolve/{revision}/{path}"
        [info] = _api(f"{HUB}/api/datasets/{repo}/paths-info/{revision}", timeout, {"paths": path})
        if "lfs" not in info:  # small files live in git itself; the hub's oid is then a sha1 of git's
            raise ValueError(f"the hub has no sha256 for {repo}@{revision}/{path} (not an LFS file)")
        return url, expected or (int(info["lfs"]["size"]), info["lfs"]["oid"]), False
    if expected is None and (seen := _load_pins()["files"].get(url)):
        return url, (seen["bytes"], seen["sha256"]), False
    return url, expected, expected is None


def _download_parts(urls: tuple[str, ...], dest: Path, expected: dict) -> None:
    # parts collect in a hidden dir that survives a crash (finished parts are kept), then one rename
    partial = dest.with_name(f".{dest.name}.partial")
    for url in urls:
        if not (partial / _basename(url)).exists():
            download_file(url, partial / _basename(url), expected=expected.get(url))
    os.rename(partial, dest)


def _download_unzip(url: str, dest: Path, expected: tuple[int, str] | None) -> None:
    archive = download_file(url, dest.with_name(f".{dest.name}.zip"), expected=expected)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        entries = list(tmp.iterdir())
        # eval_bundle.zip holds one folder (eval_bundle/); its contents are the dataset
        top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        os.rename(top, dest)
    except zipfile.BadZipFile as e:
        raise DataUnavailableError(f"{url} is not a valid zip archive ({e}).") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# reading


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .jsonl, .jsonl.gz, .json (a list) or .parquet file, or of every such file in a
    directory (in name order), so callers need not care whether it came from the hub or a mirror.

    A jsonl line that is a bare list of messages (nanochat's identity file) becomes {"messages": [...]}.
    """
    path = Path(path)
    if path.is_dir():
        return [row for p in sorted(path.iterdir()) if not p.name.startswith(".") for row in read_records(p)]
    name = path.name
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    if name.endswith(".json"):
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
        return rows
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [{"messages": row} if isinstance(row, list) else row for row in rows]
    raise ValueError(f"{path}: don't know how to read this format (.jsonl, .jsonl.gz, .json, .parquet)")
