"""
The pretraining data pipeline on Ray Data, and the feeder that hands it to the trainers.

    shards ──► parquet row groups ──► map_batches(TokenizeAndPack, actor pool) ──► packed rows
           (one item each)            (tokenizer loaded once per actor;         (T+1 tokens each,
                                       <|bos|> before every document)           in order)
    packed rows ──► BatchFeeder actor ──► slice k of each step goes to worker k % W

Why a feeder instead of `streaming_split`: a streaming split hands blocks to whichever
worker asks first, so which rows make up a step depends on timing. Here step s always
consumes the packed rows [s·R, (s+1)·R) (R = rows per optimizer step), whatever the number
of workers, so 1 worker and N workers train on the same data, and the position saved in a
checkpoint (epoch, row group, row within it) resumes the stream exactly: no row repeated or
skipped. Tokenization still runs on an actor pool spread over the cluster's CPUs, streaming
with back-pressure, while the GPUs train.

An item of the stream is a slice of at most DOCS_PER_ITEM documents of one row group, so the
first rows come after tokenizing a few documents, not a whole row group (one row group can be a
whole shard). Packing is done per item (its documents are concatenated and cut into T+1-token
rows; the short remainder is dropped): it keeps every actor independent, and costs less than
one row per DOCS_PER_ITEM documents.

The feeder is restartable: when its node is lost Ray starts it again elsewhere, empty; the
training workers' next call then fails, Ray Train restarts them from the last checkpoint, and
rank 0's reset() puts the feeder at that checkpoint's data position.
"""

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from nanochat_ray.tokenizer import Tokenizer

DOCS_PER_ITEM = 128  # documents per stream item: the first rows wait for this many, not a row group
FEEDER_TIMEOUT_S = 600.0  # a call to the feeder that takes longer is an error, not a silent hang


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: the next packed row to hand out."""
    epoch: int = 0
    item: int = 0  # index into the item list (row-group slices of DOCS_PER_ITEM documents)
    row: int = 0  # packed row within that row group

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def row_groups(shards: list[Path]) -> list[tuple[str, int, int]]:
    """Every item (shard, row group, first document), in order: row groups cut into slices of
    DOCS_PER_ITEM documents. Reads only the footers; a corrupt shard fails here, by name."""
    items = []
    for shard in shards:
        try:
            meta = pq.ParquetFile(shard).metadata
        except Exception as e:  # pyarrow raises several types for damaged files
            raise ValueError(f"pretraining shard {shard} is unreadable ({e}); delete it and run "
                             "the download again (jobs/tokenizer.py or jobs/pretrain.py fetch it)") from e
        items += [(str(shard), g, first) for g in range(meta.num_row_groups)
                  for first in range(0, meta.row_group(g).num_rows, DOCS_PER_ITEM)]
    if not items:
        raise ValueError("no pretraining shards: download them with jobs/tokenizer.py or point --data-root at a mirror")
    return items


class TokenizeAndPack:
    """Ray Data actor: read an item's documents, tokenize them with <|bos|> each, pack rows."""

    def __init__(self, tokenizer_dir: str, seq_len: int):
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)  # once per actor, not per batch
        self.row_len = seq_len + 1  # inputs and targets are shifted views of one row

    def __call__(self, batch: dict) -> dict:
        rows, order, offsets = [], [], []
        for index, shard, group, first in zip(batch["index"], batch["shard"], batch["row_group"], batch["first"]):
            try:
                texts = pq.ParquetFile(shard).read_row_group(int(group), columns=["text"]).column("text")
                texts = texts.slice(int(first), DOCS_PER_ITEM).to_pylist()
            except Exception as e:
                raise ValueError(f"pretraining shard {shard} row group {group} is unreadable ({e}); "
                                 "delete the shard and download it again") from e
            stream = np.fromiter((t for ids in self.tokenizer.encode(texts, prepend="<|bos|>") for t in ids),
                                 dtype=np.int32)
            n = len(stream) // self.row_len
            rows.append(stream[: n * self.row_len].reshape(n, self.row_len))
            order += [int(index)] * n
            offsets += list(range(n))
        return {"tokens": np.concatenate(rows) if rows else np.zeros((0, self.row_len), np.int32),
                "item": np.array(order, dtype=np.int64), "row": np.array(offsets, dtype=np.int64)}


def packed_rows(items: list[tuple[str, int, int]], tokenizer_dir: str, seq_len: int, start_item: int,
                num_actors: int, actor_cpus: float) -> "ray.data.Dataset":
    """Ray Data stream of packed rows for items[start_item:], in order."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # order is part of the data position
    ctx.enable_progress_bars = False  # the trainer logs its own progress
    todo = [{"index": i, "shard": s, "row_group": g, "first": f} for i, (s, g, f) in enumerate(items) if i >= start_item]
    return ray.data.from_items(todo).map_batches(
        TokenizeAndPack, fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir, "seq_len": seq_len},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=actor_cpus)


# -----------------------------------------------------------------------------


# max_restarts=-1: Ray brings the feeder back after its node is lost (empty: see the module docstring)
@ray.remote(num_cpus=0, max_restarts=-1)
class BatchFeeder:
    """Serves each step's rows to the training workers in a fixed order.

    Step s is split into `world_size` slices of `rows_per_slice` rows; worker r gets slice r.
    reset() returns at once and a thread reads the first step's rows, so the driver can start
    the pipeline while the training workers start. Workers ask for step s+1 before computing
    step s, so the next rows are read while they compute; the buffer holds only the steps some
    worker has asked for and not all have taken.
    """

    def __init__(self, shards: list[str], tokenizer_dir: str, seq_len: int, num_actors: int = 1,
                 actor_cpus: float = 0.5):
        self.items = row_groups([Path(s) for s in shards])
        self.tokenizer_dir, self.seq_len = tokenizer_dir, seq_len
        self.num_actors, self.actor_cpus = num_actors, actor_cpus
        self.rows, self.started, self.fill_error = None, None, None
        self.lock = threading.Lock()  # the warm-up thread and get() fill the buffer in turn
        self.first_rows_at: float | None = None  # time.time() when the first step's rows were ready

    def reset(self, position: dict, step: int, world_size: int, rows_per_slice: int) -> None:
        """Start (or restart, after a failure) serving from `position` at training step `step`.

        A reset to where the feeder already stands, before any row was served, keeps what it has
        read (the driver's reset and rank 0's, on a first start)."""
        request = (position, step, world_size, rows_per_slice)
        with self.lock:
            if request == self.started and self.untouched:
                return
            self.started, self.untouched = request, True
            self.position = DataPosition(**position)
            self.world_size, self.rows_per_slice = world_size, rows_per_slice
            self.next_step = step  # the step whose rows go into the buffer next
            self.buffer: dict[int, list] = {}  # step -> [slices, position after the step, workers served]
            self.rows = self._rows(self.position)
            self.first_rows_at, self.fill_error = None, None
        threading.Thread(target=self._fill, args=(step, self.rows), daemon=True).start()

    def _fill(self, step: int, rows) -> None:
        """Read `step`'s rows into the buffer, unless a newer reset came first (an error is raised
        by the next get())."""
        with self.lock:
            if rows is self.rows:
                try:
                    self._read_through(step)
                except Exception as e:
                    self.fill_error = e

    def _read_through(self, step: int) -> None:
        while self.next_step <= step:
            picked = [next(self.rows) for _ in range(self.world_size * self.rows_per_slice)]
            rows = np.stack([tokens for tokens, _ in picked])
            slices = np.split(rows, self.world_size)
            self.position = picked[-1][1]
            self.buffer[self.next_step] = [slices, self.position, 0]
            self.next_step += 1
            self.first_rows_at = self.first_rows_at or time.time()

    def _rows(self, position: DataPosition):
        """Packed rows from `position` on, epoch after epoch, each with the position after it."""
        while True:
            ds = packed_rows(self.items, self.tokenizer_dir, self.seq_len, position.item,
                             self.num_actors, self.actor_cpus)
            produced = False
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
                for tokens, item, row in zip(batch["tokens"], batch["item"], batch["row"]):
                    if (item, row) < (position.item, position.row):
                        continue  # rows before the saved position, inside its item
                    produced = True
                    yield tokens, DataPosition(position.epoch, int(item), int(row) + 1)
            if not produced and (position.item, position.row) == (0, 0):
                raise ValueError(f"the shards hold no row of {self.seq_len + 1} tokens; "
                                 "give more text or a shorter seq_len")
            position = DataPosition(position.epoch + 1, 0, 0)

    def get(self, step: int, rank: int) -> tuple[np.ndarray, dict]:
        """Worker `rank`'s rows for `step` (int32, (rows_per_slice, T+1)) and the position after the step."""
        with self.lock:
            if self.rows is None:
                raise RuntimeError("the data feeder has no position: it was just (re)started, e.g. after its node "
                                   "was lost; the training workers restart from the last checkpoint, which resets it")
            if self.fill_error is not None:
                raise self.fill_error
            if step < self.next_step and step not in self.buffer:
                raise RuntimeError(f"step {step} was already served to every worker; reset() to replay it")
            self.untouched = False
            self._read_through(step)
            entry = self.buffer[step]
            entry[2] += 1
            if entry[2] == self.world_size:
                del self.buffer[step]  # every worker has its slice
            return entry[0][rank], entry[1].to_dict()

    def first_rows_time(self) -> float | None:
        """time.time() at which the first step's rows were ready (for the start-up breakdown)."""
        return self.first_rows_at


def get_within(ref: "ray.ObjectRef", what: str, timeout: float = FEEDER_TIMEOUT_S):
    """ray.get with a deadline: a feeder that stopped answering fails the step, loudly, instead of
    hanging the training workers (which Ray Train then restarts from the last checkpoint)."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise TimeoutError(f"the data feeder gave no answer for {what} in {timeout:.0f} s: its pipeline is stuck "
                           "or starved of CPUs (see the Ray dashboard's actors and the data actors' logs)") from e
