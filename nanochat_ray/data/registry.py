"""
Every dataset of the pipeline (SPEC §1): where the reference downloads it, and where it sits in a
local mirror laid out like shared/data (for machines without hub access).

    path = resolve("gsm8k", "train")          # mirror file, else cached download
    rows = read_records(path)                 # list of dicts, whatever the file format

The mirror root is the `data_root` argument (a job's --data-root), else NANOCHAT_DATA, else none.
Downloads go to base_dir()/data/<dataset>/<split>/ through a temp file renamed on success, with
retries and exponential backoff. Pretraining shards: shard_url(i); data/download.py fetches
many of them in parallel with Ray tasks on top of download_file.
"""

import gzip
import json
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat_ray.common import base_dir

HF = "https://huggingface.co/datasets"
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
    "words": {  # English word list for the spelling tasks
        "all": Source(("https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/"
                       "words_alpha.txt",), "words/words_alpha.txt"),
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
    try:
        if single:
            download_file(source.urls[0], dest)
        elif source.unzip:
            _download_unzip(source.urls[0], dest)
        else:
            _download_parts(source.urls, dest)
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


def download_file(url: str, dest: str | Path, retries: int = 5, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`: into a temp file beside it, validated (a parquet file must open
    and have rows, anything else must be non-empty), then renamed. Retries with exponential
    backoff; raises DataUnavailableError naming the URL and the last error."""
    if retries < 1:
        raise ValueError("retries counts attempts and must be at least 1")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    host = urllib.parse.urlsplit(url).hostname
    if host in _UNRESOLVED_HOSTS:
        # an offline machine would otherwise wait out the whole backoff again for every file
        raise DataUnavailableError(f"could not download {url}: its host {host} did not resolve earlier in this "
                                   f"process (no network?)")
    for attempt in range(1, retries + 1):
        # a unique hidden temp name: parallel downloaders never share one, shard globs skip it
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                _fetch(url, f, timeout, dest.name)
            _validate(Path(tmp), dest.name)
            os.replace(tmp, dest)
            return dest
        except Exception as e:
            error = e
            # a 4xx other than timeout / rate limit will not fix itself
            permanent = (isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500
                         and e.code not in (408, 429))
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


def _fetch(url: str, f, timeout: float, name: str) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        # disable=None: no bar when stderr is not a terminal (e.g. inside Ray workers)
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())


def _validate(path: Path, name: str) -> None:
    # catches error pages and truncated transfers saved under a data file's name
    if name.endswith(".parquet"):
        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise ValueError(f"{name}: parquet file has no rows")
    elif path.stat().st_size == 0:
        raise ValueError(f"{name}: empty download")


def _download_parts(urls: tuple[str, ...], dest: Path) -> None:
    # parts collect in a hidden dir that survives a crash (finished parts are kept), then one rename
    partial = dest.with_name(f".{dest.name}.partial")
    for url in urls:
        if not (partial / _basename(url)).exists():
            download_file(url, partial / _basename(url))
    os.rename(partial, dest)


def _download_unzip(url: str, dest: Path) -> None:
    archive = download_file(url, dest.with_name(f".{dest.name}.zip"))
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
