"""
Pretraining shards (FineWeb-Edu parquet, SPEC §1): which ones a run uses, and fetching them in the
background with Ray while other work goes on.

    paths = shard_paths(240)                     # 239 train shards, then the val shard
    downloads = start_downloads(240)             # returns at once; Ray tasks fetch in the background
    train, val = train_and_val_shards(downloads.paths)
    downloads.wait(train[:8])                    # block only for the shards needed next
    downloads.wait()                             # all of them; raises naming any shard that failed

A run of N shards uses hub shards 0..N-2 for training and the hub's last shard (NUM_SHARDS-1) for
validation, so the val shard stays the same whatever N is, and is still the last one on disk.
With a local mirror (--data-root / NANOCHAT_DATA holding pretrain_text/) the mirror's files are used
in place, its last file as validation, and nothing is downloaded.

Each download is one Ray task (download_file: the pinned commit, size and sha256 from the hub,
temp file, checks, rename, retries with backoff); at most `max_concurrency` run at once. Called from jobs/tokenizer.py (and pretraining).
"""

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from nanochat_ray.config import Config
from nanochat_ray.data.registry import (
    MIRROR_HINT, NUM_SHARDS, DataUnavailableError, cache_dir, download_file, mirror_root, shard_url,
)

# planning figures of the reference (its speedrun script): characters per hub shard, and the
# characters one token stands for with the 65K tokenizer
CHARS_PER_SHARD = 250_000_000
CHARS_PER_TOKEN = 4.8


def shards_needed(cfg: Config) -> int:
    """Shards (val included) a run of `cfg` needs: enough for the tokenizer's text and for the
    pretraining horizon plus 10%, then the val shard. d20: 216 → 238 + 1 (the reference rounds to 240)."""
    tokens = cfg.horizon() * cfg.total_batch_size
    pretrain = math.ceil(1.1 * math.ceil(tokens * CHARS_PER_TOKEN / CHARS_PER_SHARD))
    tokenizer = math.ceil(cfg.tokenizer_max_chars / CHARS_PER_SHARD)
    return min(NUM_SHARDS, max(pretrain, tokenizer) + 1)


# -----------------------------------------------------------------------------
# which files


def _mirror_shards(data_root: str | Path | None) -> list[Path]:
    root = mirror_root(data_root)
    return sorted((root / "pretrain_text").glob("shard_*.parquet")) if root else []


def _hub_indices(num_shards: int) -> list[int]:
    if not 2 <= num_shards <= NUM_SHARDS:
        raise ValueError(f"num_shards must lie in 2..{NUM_SHARDS} (at least one train shard and the val shard), "
                         f"got {num_shards}")
    return [*range(num_shards - 1), NUM_SHARDS - 1]


def shard_paths(num_shards: int, data_root: str | Path | None = None) -> list[Path]:
    """The `num_shards` shard files a run uses, train shards first and the val shard last.

    Mirror files when the mirror has pretrain_text/ (all of them if it holds fewer than asked),
    else base_dir()/data/pretrain/shard_XXXXX.parquet (present or not: start_downloads fetches them).
    """
    indices = _hub_indices(num_shards)
    if mirror := _mirror_shards(data_root):
        if len(mirror) < 2:
            raise DataUnavailableError(f"the mirror {mirror[0].parent} holds one shard; a run needs a train "
                                       "shard and a val shard")
        if num_shards >= len(mirror):
            if num_shards > len(mirror):
                print(f"the mirror {mirror[0].parent} holds {len(mirror)} shards, fewer than the "
                      f"{num_shards} asked for: using all {len(mirror)}", flush=True)
            return mirror
        return mirror[:num_shards - 1] + mirror[-1:]
    return [cache_dir("pretrain") / f"shard_{i:05d}.parquet" for i in indices]


def train_and_val_shards(paths: list[Path]) -> tuple[list[Path], Path]:
    """Split a shard list from shard_paths into (train shards, the val shard): the val shard is last."""
    if len(paths) < 2:
        raise ValueError(f"need at least one train shard and the val shard, got {len(paths)} shard(s)")
    return paths[:-1], paths[-1]


def _readable(path: Path) -> bool:
    # reads only the footer: catches missing, truncated and error-page files without reading the data
    try:
        return pq.ParquetFile(path).metadata.num_rows > 0
    except Exception:  # pyarrow raises several types for damaged files
        return False


# -----------------------------------------------------------------------------
# downloading


# I/O-bound: a quarter CPU each, so downloads overlap tokenizer training on a small machine.
# max_retries re-runs the task if its worker dies; download_file retries network errors itself.
@ray.remote(num_cpus=0.25, max_retries=3)
def _download_shard(url: str, dest: str, retries: int) -> int:
    return download_file(url, dest, retries=retries).stat().st_size


class ShardDownloads:
    """Shards being fetched by a background thread that keeps at most `max_concurrency` Ray tasks
    in flight. Create with start_downloads."""

    def __init__(self, shards: list[tuple[Path, str | None]], max_concurrency: int, retries: int):
        self.paths = [path for path, _ in shards]  # train shards, then the val shard
        self.max_concurrency = max_concurrency
        self._retries = retries
        self._finished = {path: threading.Event() for path in self.paths}
        self._errors: dict[Path, str] = {}
        # val first: the tokenizer's eval and every pretraining eval need it early; then train in order
        self._order = [shards[-1]] + shards[:-1]
        self._thread = threading.Thread(target=self._run, name="shard-downloads", daemon=True)
        self._thread.start()

    def wait(self, paths: list[Path] | None = None) -> None:
        """Block until `paths` (default: all) are on disk; raise DataUnavailableError naming every
        one of them that could not be fetched."""
        paths = self.paths if paths is None else [Path(p) for p in paths]
        unknown = [str(p) for p in paths if p not in self._finished]
        if unknown:
            raise ValueError(f"not among these downloads: {unknown}")
        for path in paths:
            self._finished[path].wait()
        if failed := [self._errors[p] for p in paths if p in self._errors]:
            raise DataUnavailableError("pretraining shards unavailable:\n  " + "\n  ".join(failed)
                                       + f"\n{MIRROR_HINT}")

    def _finish(self, path: Path, error: str | None = None) -> None:
        if error is not None:
            self._errors[path] = error
        self._finished[path].set()

    def _run(self) -> None:
        try:
            self._download_missing()
        except Exception as e:  # e.g. Ray went away: fail every waiter instead of hanging it
            for path in self.paths:
                if not self._finished[path].is_set():
                    self._finish(path, f"{path}: download thread failed ({e!r})")

    def _download_missing(self) -> None:
        missing = []
        for path, url in self._order:
            if _readable(path):
                self._finish(path)
            elif url is None:
                self._finish(path, f"{path} is missing or not a readable parquet file")
            else:  # absent, or damaged (e.g. truncated): fetched again
                missing.append((path, url))
        if not missing:
            return
        print(f"downloading {len(missing)} of {len(self.paths)} shards to {missing[0][0].parent}, "
              f"{self.max_concurrency} at a time", flush=True)
        # the driver decides which shards are present by looking at its own disk, so the files
        # must land there: pin the tasks to this node (free with a shared file system)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        in_flight: dict[ray.ObjectRef, tuple[Path, str]] = {}
        start, downloaded = time.perf_counter(), 0
        with tqdm(total=len(missing), unit="shard", desc="shards") as bar:
            while missing or in_flight:
                while missing and len(in_flight) < self.max_concurrency:
                    path, url = missing.pop(0)
                    task = _download_shard.options(scheduling_strategy=here)
                    in_flight[task.remote(url, str(path), self._retries)] = (path, url)
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                path, url = in_flight.pop(ref)
                try:
                    downloaded += ray.get(ref)
                    self._finish(path)
                except Exception as e:
                    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                    self._finish(path, f"{path.name} from {url}: {cause}")
                bar.update(1)
                bar.set_postfix_str(f"{downloaded / 1e6 / (time.perf_counter() - start):.1f} MB/s")


def start_downloads(num_shards: int, data_root: str | Path | None = None, max_concurrency: int = 8,
                    url_for: Callable[[int], str] = shard_url, retries: int = 5) -> ShardDownloads:
    """Start fetching the shards of shard_paths(num_shards, data_root); returns at once.

    Needs Ray initialised. Shards already present and readable are skipped; a damaged one is
    fetched again (download_file with `retries` attempts). Mirror shards are only checked.
    `url_for(hub index)` gives each shard's URL (the hub's by default; tests pass a local server).
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    paths = shard_paths(num_shards, data_root)
    if _mirror_shards(data_root):
        shards = [(path, None) for path in paths]
    else:
        shards = [(path, url_for(i)) for path, i in zip(paths, _hub_indices(num_shards))]
    return ShardDownloads(shards, max_concurrency, retries)
