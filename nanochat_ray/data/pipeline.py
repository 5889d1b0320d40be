"""
The data pipelines of every training stage on Ray Data, and the feeders that hand them to the trainers.

Pretraining (BatchFeeder):
    shards ──► parquet row groups ──► map_batches(TokenizeAndPack, actor pool) ──► packed rows
           (one item each)            (tokenizer loaded once per actor;         (T+1 tokens each,
                                       <|bos|> before every document)           in order)
Midtraining and SFT (ChatFeeder):
    mixture ──► runs of conversations ──► map_batches(RenderConversations, actor pool) ──► rendered
                (one item each)            (mixture and tokenizer built once per actor)   conversations
    rendered conversations ──► mid: concatenated and cut into T+1-token rows (pack_rows)
                           ──► sft: one conversation per row, padded per worker (padded_rows)
Every stage:
    rows ──► feeder actor ──► slice k of each step goes to worker k % W

Why a feeder instead of `streaming_split`: a streaming split hands blocks to whichever
worker asks first, so which rows make up a step depends on timing. Here step s always
consumes the rows [s·R, (s+1)·R) (R = rows per optimizer step), whatever the number
of workers, so 1 worker and N workers train on the same data, and the position saved in a
checkpoint resumes the stream exactly: no row repeated or skipped. Tokenizing and rendering
run on an actor pool spread over the cluster's CPUs, streaming with back-pressure, while the
GPUs train; each worker receives only its own slice, and asks for step s+1 before computing s.

Pretraining's stream items are slices of at most DOCS_PER_ITEM documents of one row group, so
the first rows come after tokenizing a few documents, not a whole row group (one row group can
be a whole shard). Packing is done per item (its documents are concatenated and cut into
T+1-token rows; the short remainder is dropped): it keeps every actor independent, and costs
less than one row per DOCS_PER_ITEM documents. Midtraining packs across conversations (a conversation
may span two rows, and epochs run into each other), so the cut is made in order by the feeder:
a numpy slice, next to the rendering the actors do.

The feeders are restartable: when a feeder's node is lost Ray starts it again elsewhere, empty;
the training workers' next call then fails, Ray Train restarts them from the last checkpoint,
and rank 0's reset() puts the feeder at that checkpoint's data position.
"""

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import ray

from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.data.rows import PAD_ID

# The data actors' processes import this module (their classes live here) and nothing of torch:
# its import is a second of CPU per process, on cores the training's start-up needs
# (tests/test_layout.py). What the training workers call here imports torch where it runs.
if TYPE_CHECKING:
    from nanochat_ray.config import Config
    from nanochat_ray.tasks import Task
    from nanochat_ray.train.loop import Batches, TrainState

CONVERSATIONS_PER_ITEM = 256  # one Ray Data item: enough work per call, and the first rows come fast
ITEMS_PER_STREAM = 1024  # whole epochs of a small mixture run in one stream: its actors start once
DOCS_PER_ITEM = 128  # pretraining documents per stream item: the first rows wait for this many, not a row group
FEEDER_TIMEOUT_S = 600.0  # a call to the feeder that takes longer is an error, not a silent hang
RUN_AHEAD_STEPS = 8  # pretraining: optimizer steps of rows Ray Data may hold beyond what the feeder took
ITEM_BYTES = 1 << 20  # about one item's packed rows (128 documents of ~2,000 tokens, int32)
BACKGROUND_NICENESS = 10  # OS priority of data actors that share the trainers' cores (nice 10: ~1/10 of a core when contended)


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: the next row (or token) to hand out."""
    epoch: int = 0
    item: int = 0  # pretraining: index into the item list (row-group slices of DOCS_PER_ITEM documents); mid and sft: conversation of the mixture
    row: int = 0  # pretraining: packed row within that item
    token: int = 0  # midtraining: tokens of that conversation already in rows

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


class DataActor:
    """An actor of the pipelines (Ray Data's and the feeders). With no CPUs reserved for it (CPU-only
    runs) it shares the training workers' cores, so it works in the background: the pipeline runs
    ahead on the cores the training leaves idle instead of taking them from the training processes
    (at start-up: from the Ray Train worker's imports, model build and first step). Ray Data's map
    actors, the pipeline's CPU work, run in Linux's idle scheduling class (a core only when nothing
    else wants it: at nice 19 against the Ray workers' 15 they still took ~30% of the core of the
    trainer's second thread, and step 1 took 3.5 s instead of 2.4); the feeders, which answer the
    workers' calls, at nice +10, so that an answer waits for no idle core."""
    IDLE_CLASS = True

    def __init__(self, background: bool):
        if background and not (self.IDLE_CLASS and enter_idle_class()):
            os.nice(BACKGROUND_NICENESS)


def enter_idle_class() -> bool:
    """Put this thread, and the threads it starts, in Linux's SCHED_IDLE; False where that can't be
    done (not Linux, or not allowed)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


class TokenizeAndPack(DataActor):
    """Ray Data actor: read an item's documents, tokenize them with <|bos|> each, pack rows."""

    def __init__(self, tokenizer_dir: str, seq_len: int, background: bool = False):
        super().__init__(background)
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


def ordered_map(items: list[dict], actor: type, actor_kwargs: dict, num_actors: int,
                actor_cpus: float, run_ahead_bytes: int | None = None) -> "ray.data.Dataset":
    """Ray Data stream of `actor`'s output for each item (one per call, on a pool of actors), in item
    order. Actors given no CPUs work in the background (DataActor). `run_ahead_bytes` caps the
    object store Ray Data may fill ahead of the consumer (default: Ray Data's own budget, a share of
    the object store, which lets it tokenize whole shards ahead)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # order is part of the data position
    ctx.enable_progress_bars = False  # the trainer logs its own progress
    # (imported here: Ray Data's import at this module's top would come before the driver starts the feeder)
    from nanochat_ray.data.pacing import PacedScheduling

    if PacedScheduling not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(PacedScheduling)
    if run_ahead_bytes is not None:  # (this process's context: one pipeline per feeder actor)
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=run_ahead_bytes)
    return ray.data.from_items(items).map_batches(
        actor, fn_constructor_kwargs=actor_kwargs | {"background": actor_cpus == 0}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=actor_cpus)


def packed_rows(items: list[tuple[str, int, int]], tokenizer_dir: str, seq_len: int, start_item: int,
                num_actors: int, actor_cpus: float, run_ahead_bytes: int | None = None) -> "ray.data.Dataset":
    """Ray Data stream of packed rows for items[start_item:], in order (ordered_map's run-ahead cap)."""
    todo = [{"index": i, "shard": s, "row_group": g, "first": f} for i, (s, g, f) in enumerate(items) if i >= start_item]
    return ordered_map(todo, TokenizeAndPack, {"tokenizer_dir": tokenizer_dir, "seq_len": seq_len},
                       num_actors, actor_cpus, run_ahead_bytes)


class RenderConversations(DataActor):
    """Ray Data actor: render conversations [start, stop) of a mixture as the tokenizer does for chat:
    token ids, or with `masked` (2, n) ids and the assistant mask, cut to max_tokens."""

    def __init__(self, mixture: Callable[[], "Task"], tokenizer_dir: str, max_tokens: int, masked: bool,
                 background: bool = False):
        super().__init__(background)
        self.mixture = mixture()  # once per actor: loading the datasets takes seconds
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)
        self.max_tokens, self.masked = max_tokens, masked

    def render(self, start: int, stop: int) -> list[np.ndarray]:
        rendered = []
        for i in range(start, stop):
            ids, mask = self.tokenizer.render_conversation(self.mixture[i], self.max_tokens)
            rendered.append(np.array([ids, mask] if self.masked else ids, dtype=np.int32))
        return rendered

    def __call__(self, batch: dict) -> dict:
        epochs, index, tokens = [], [], []
        for epoch, start, stop in zip(batch["epoch"], batch["start"], batch["stop"]):
            epochs += [int(epoch)] * (int(stop) - int(start))
            index += range(int(start), int(stop))
            tokens += self.render(int(start), int(stop))
        column = np.empty(len(tokens), dtype=object)  # one array per conversation, of its own length
        for k, t in enumerate(tokens):
            column[k] = t
        return {"epoch": np.array(epochs, dtype=np.int64), "conversation": np.array(index, dtype=np.int64),
                "tokens": column}


class CountTokens(RenderConversations):
    """Ray Data actor: the number of tokens of conversations [start, stop), rendered."""

    def __call__(self, batch: dict) -> dict:
        return {"tokens": np.array([sum(len(t) for start, stop in zip(batch["start"], batch["stop"])
                                        for t in self.render(int(start), int(stop)))], dtype=np.int64)}


def pack_rows(conversations: Iterable[tuple[Any, np.ndarray]], row_len: int) -> Iterator[tuple[np.ndarray, Any, int]]:
    """Conversations (a key, and (n,) tokens or (2, n) tokens and mask) concatenated and cut into
    rows of row_len tokens. Yields each row with the key of the last conversation read and how
    many of its tokens are left over after the row: the row's position in the stream."""
    pending: list[np.ndarray] = []
    held = 0
    for key, tokens in conversations:
        pending.append(tokens)
        held += tokens.shape[-1]
        if held < row_len:
            continue
        joined = np.concatenate(pending, axis=-1)
        full = held // row_len
        for k in range(full):
            # what is left over after a row is all from this conversation: before it came, fewer
            # than row_len tokens were held
            yield joined[..., k * row_len:(k + 1) * row_len], key, held - (k + 1) * row_len
        pending = [joined[..., full * row_len:]]
        held -= full * row_len


def padded_rows(conversations: list) -> np.ndarray:
    """(n, 2, longest) tokens and mask of conversations ((ids, mask) pairs or (2, n) arrays), padded
    at the end with token PAD_ID (mask 0): the loop feeds it as token 0 and counts only the other
    tokens in tokens/s and MFU."""
    conversations = [np.asarray(c) for c in conversations]
    rows = np.zeros((len(conversations), 2, max(c.shape[-1] for c in conversations)), dtype=np.int32)
    rows[:, 0] = PAD_ID
    for row, c in zip(rows, conversations):
        row[:, :c.shape[-1]] = c
    return rows


# -----------------------------------------------------------------------------


class StepFeeder(DataActor):
    """Serves each step's rows to the training workers in a fixed order (the Ray actors below).

    Step s is split into `world_size` slices of `rows_per_slice` rows; worker r gets slice r.
    reset() returns at once and a thread reads the first step's rows, so the driver can start
    the pipeline while the training workers start. Workers ask for step s+1 before computing
    step s, so the next rows are read while they compute; the buffer holds only the steps some
    worker has asked for and not all have taken. Subclasses give the rows, each with the
    position after it, and how a slice's rows are batched.
    """
    IDLE_CLASS = False  # it answers the workers' calls

    def __init__(self, background: bool):
        super().__init__(background)
        self.rows, self.started, self.fill_error = None, None, None
        self.lock = threading.Lock()  # the warm-up thread and get() fill the buffer in turn
        self.first_rows_at: float | None = None  # time.time() when the first step's rows were ready

    def _rows(self, position: DataPosition) -> Iterator[tuple[np.ndarray, DataPosition]]:
        raise NotImplementedError

    def _collate(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows)

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
        n = self.rows_per_slice
        while self.next_step <= step:
            picked = [next(self.rows) for _ in range(self.world_size * n)]
            slices = [self._collate([row for row, _ in picked[k * n:(k + 1) * n]]) for k in range(self.world_size)]
            self.position = picked[-1][1]
            self.buffer[self.next_step] = [slices, self.position, 0]
            self.next_step += 1
            self.first_rows_at = self.first_rows_at or time.time()

    def get(self, step: int, rank: int) -> tuple[np.ndarray, dict]:
        """Worker `rank`'s rows for `step` and the position after the step."""
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


# max_restarts=-1: Ray brings a feeder back after its node is lost (empty: see the module docstring)
@ray.remote(num_cpus=0, max_restarts=-1)
class BatchFeeder(StepFeeder):
    """Pretraining rows: int32 (rows_per_slice, T+1) per worker."""

    def __init__(self, shards: list[str], tokenizer_dir: str, seq_len: int, num_actors: int = 1,
                 actor_cpus: float = 0.5):
        super().__init__(background=actor_cpus == 0)  # the feeder's work is the data actors' kind
        self.items = row_groups([Path(s) for s in shards])
        self.tokenizer_dir, self.seq_len = tokenizer_dir, seq_len
        self.num_actors, self.actor_cpus = num_actors, actor_cpus

    def _rows(self, position: DataPosition):
        """Packed rows from `position` on, epoch after epoch, each with the position after it."""
        # Ray Data runs ahead at most RUN_AHEAD_STEPS steps of rows, and at least two items per actor
        # (each keeps one call in flight): without a cap it tokenizes whole shards ahead, which on a
        # CPU-only run takes the cores from the training's start-up and steps
        step_bytes = self.world_size * self.rows_per_slice * (self.seq_len + 1) * 4
        run_ahead = max(RUN_AHEAD_STEPS * step_bytes, 2 * self.num_actors * ITEM_BYTES)
        while True:
            ds = packed_rows(self.items, self.tokenizer_dir, self.seq_len, position.item,
                             self.num_actors, self.actor_cpus, run_ahead)
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


@ray.remote(num_cpus=0, max_restarts=-1)
class ChatFeeder(StepFeeder):
    """Midtraining rows (`packed`): int32 (rows_per_slice, T+1), conversations concatenated;
    SFT rows: int32 (rows_per_slice, 2, longest) tokens and assistant mask, one conversation
    (cut to T+1 tokens) per row, padded to the slice's longest. Conversation i of epoch e is
    mixture[i]; the mixture is built by `mixture()` on each rendering actor."""

    def __init__(self, mixture: Callable[[], "Task"], size: int, tokenizer_dir: str, seq_len: int, packed: bool,
                 num_actors: int = 1, actor_cpus: float = 0.5):
        if size < 1:
            raise ValueError("the conversation mixture is empty")
        super().__init__(background=actor_cpus == 0)
        self.size, self.packed, self.row_len = size, packed, seq_len + 1
        self.num_actors, self.actor_cpus = num_actors, actor_cpus
        # as before streaming: midtraining renders whole conversations (up to 2,048 tokens) and
        # packs them, SFT cuts each conversation to its row
        self.render_kwargs = {"mixture": mixture, "tokenizer_dir": tokenizer_dir, "masked": not packed,
                              "max_tokens": 2048 if packed else self.row_len}
        self.token_count: int | None = None

    def _stream(self, epoch: int, first: int, epochs: int, actor: type) -> "ray.data.Dataset":
        """Runs of conversations from conversation `first` of `epoch`, through `epochs` epochs."""
        per_item = CONVERSATIONS_PER_ITEM
        runs = [{"epoch": e, "start": s, "stop": min(s + per_item, self.size)}
                for e in range(epoch, epoch + epochs)
                for s in range(first - first % per_item if e == epoch else 0, self.size, per_item)]
        return ordered_map(runs, actor, self.render_kwargs, self.num_actors, self.actor_cpus)

    def epoch_tokens(self) -> int:
        """Tokens in one epoch of the mixture as midtraining renders it (its horizon, when not given)."""
        if self.token_count is None:
            self.token_count = int(self._stream(0, 0, 1, CountTokens).sum("tokens"))
        return self.token_count

    def _conversations(self, position: DataPosition) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
        """((epoch, conversation, its length), its tokens not yet in a row), from `position` on, epoch after epoch."""
        epoch, first, skip = position.epoch, position.item, position.token
        if first >= self.size:  # SFT's position after the epoch's last conversation
            epoch, first, skip = epoch + 1, 0, 0
        epochs = max(1, ITEMS_PER_STREAM // -(-self.size // CONVERSATIONS_PER_ITEM))  # per stream
        while True:
            for batch in self._stream(epoch, first, epochs, RenderConversations).iter_batches(
                    batch_size=None, batch_format="numpy", prefetch_batches=4):
                for e, i, tokens in zip(batch["epoch"], batch["conversation"], batch["tokens"]):
                    if (e, i) == (epoch, first):
                        yield (int(e), int(i), tokens.shape[-1]), tokens[..., skip:]
                    elif (e, i) > (epoch, first):  # (the run holding the saved position starts before it)
                        yield (int(e), int(i), tokens.shape[-1]), tokens
            epoch, first, skip = epoch + epochs, 0, 0

    def _rows(self, position: DataPosition):
        if self.packed:
            for row, (epoch, i, length), left in pack_rows(self._conversations(position), self.row_len):
                yield row, DataPosition(epoch, i, token=length - left)
        else:
            for (epoch, i, _), tokens in self._conversations(position):
                yield tokens, DataPosition(epoch, i + 1)

    def _collate(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows) if self.packed else padded_rows(rows)


def feeder_batches(feeder: "ray.actor.ActorHandle", cfg: "Config", rank: int, world_size: int,
                   state: "TrainState") -> "Batches":
    """A training worker's rows from a feeder, from state.step / state.data_position on."""
    if rank == 0:  # a no-op when the driver already started the feeder here (a first start)
        get_within(feeder.reset.remote(state.data_position, state.step, world_size, rows_per_slice(cfg, world_size)),
                   "reset")
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # nobody asks for rows before the feeder is at the right position

    def batches(step: int):
        ref = feeder.get.remote(step, rank)  # asked one step ahead: the rows are made while this step computes
        return lambda: get_within(ref, f"step {step}'s rows")
    return batches


def rows_per_slice(cfg: "Config", world_size: int) -> int:
    """Rows each worker takes per optimizer step."""
    return cfg.grad_accum_steps(world_size) * cfg.device_batch_size


def get_within(ref: "ray.ObjectRef", what: str, timeout: float = FEEDER_TIMEOUT_S):
    """ray.get with a deadline: a feeder that stopped answering fails the step, loudly, instead of
    hanging the training workers (which Ray Train then restarts from the last checkpoint)."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise TimeoutError(f"the data feeder gave no answer for {what} in {timeout:.0f} s: its pipeline is stuck "
                           "or starved of CPUs (see the Ray dashboard's actors and the data actors' logs)") from e

