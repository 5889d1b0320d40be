"""
Continuous batching for one model replica: requests join and leave a shared DecodeBatch between
steps, and one decode loop advances all of them with one forward per step.

    batcher = Batcher(model, tokenizer, max_batch=32, max_queue=64, interval_s=0.05)
    async for pieces in batcher.stream(prompt_ids, Sampling(max_tokens=64, n=2)): ...  # ids per choice
    result = await batcher.run(fn, *args)   # any other model work, between decode steps

Plain asyncio around the engine (no Ray), so it runs and tests in one process. The forward runs
in a worker thread, so the event loop keeps streaming tokens, accepting requests and noticing
disconnects while the model computes. Only the loop task touches the DecodeBatch: a client that
leaves is recorded and its row removed before the next step. A stream hands out the tokens of
`interval_s` at a time (the first at once): every item a client gets costs a message through each
process between the model and the socket, so 16 clients at one token per step would cost more than
the forward itself.
"""

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nanochat_ray.engine import DecodeBatch, Generated
from nanochat_ray.gpt import GPT
from nanochat_ray.tokenizer import Tokenizer


class Overloaded(Exception):
    """The waiting queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1):
        super().__init__(f"server busy: {waiting} requests already waiting for a free slot")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 42
    top_p: float | None = None
    n: int = 1  # rows (choices) from one prefill; choice i is seeded seed + i


_END = object()  # queued after a request's last token


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampling: Sampling
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # (choice, token id), then _END or an exception
    row_ids: list[int] = field(default_factory=list)  # choice i decodes in row row_ids[i]
    open: int = 0  # choices still decoding
    gone: bool = False  # the consumer stopped listening
    ended: bool = False  # its last item (_END or an exception) is queued


class Batcher:
    """Owns one DecodeBatch and the loop that steps it.

    `max_batch` rows decode together; up to `max_queue` more requests wait for a free row, and
    one more is refused with Overloaded. `on_step(batch_size)` is called on the event loop after
    every step (metrics). A stream yields at most once per `interval_s` (0: once per step).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int, max_queue: int,
                 device_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 on_step: Callable[[int], None] = lambda n: None, interval_s: float = 0.0):
        with device_context():  # the KV cache takes the compute dtype (bf16 under autocast)
            self.batch = DecodeBatch(model, tokenizer, max_rows=max_batch, seq_len=model.config.sequence_len)
        self.max_batch, self.max_queue, self.interval_s = max_batch, max_queue, interval_s
        self.device_context, self.on_step = device_context, on_step
        self.waiting: deque[_Request] = deque()
        self.live: dict[int, tuple[_Request, int]] = {}  # row id → (request, choice), for rows whose client listens
        self.leaving: list[int] = []  # rows whose client left; removed before the next step
        self._joining: list[_Request] = []  # requests whose prefill runs in this step
        self.steps = 0
        self.tokens_generated = 0
        self.step_started: float | None = None  # monotonic time the running forward began
        self.failures_in_a_row = 0  # decode steps that raised since the last one that did not
        self.last_error: Exception | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decode")

    def stats(self) -> dict:
        return {"active": len(self.live) + sum(r.sampling.n for r in self._joining), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps, "tokens_generated": self.tokens_generated}

    def health(self, stuck_after_s: float, max_failures: int) -> str | None:
        """Why this batcher cannot serve (None when it can): a forward running longer than
        stuck_after_s (a hung device or kernel), or max_failures steps in a row that raised."""
        if self.step_started is not None and (running := time.monotonic() - self.step_started) > stuck_after_s:
            return f"the decode loop is stuck: one step has run for {running:.0f} s (limit {stuck_after_s:g} s)"
        if self.failures_in_a_row >= max_failures:
            return f"{self.failures_in_a_row} decode steps in a row failed; the last: {self.last_error!r}"
        return None

    async def stream(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[list[list[int]]]:
        """The request's token ids as they are produced, one list per choice (sampling.n).

        The first item is [] as soon as the request is queued (or Overloaded is raised), so a
        server can answer 429 before it commits to a stream. Then each item holds, per choice,
        every token that arrived since the previous one, at least interval_s after it unless the
        request ended (a slow reader gets bigger pieces, not a backlog). A choice's terminal
        token, when it ends with one, is its last id. Closing the iterator frees the request's
        rows before the next step.
        """
        if not 1 <= sampling.n <= self.max_batch:
            raise ValueError(f"n={sampling.n}: a request may take 1 to {self.max_batch} rows")
        # rows that are free now take requests that arrive while a step runs, before the loop
        # moves them out of the queue
        free_rows = self.max_batch - len(self.live) - sum(r.sampling.n for r in self._joining)
        if len(self.waiting) >= self.max_queue + max(free_rows, 0):
            raise Overloaded(len(self.waiting))
        request = _Request(prompt, sampling)
        self.waiting.append(request)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run())
        self._wake.set()
        clock = asyncio.get_running_loop().time
        try:
            yield []
            sent = -self.interval_s  # the first token goes out at once
            while True:
                items = [await request.tokens.get()]
                if not request.ended and (wait := sent + self.interval_s - clock()) > 0:
                    await asyncio.sleep(wait)  # more tokens of this request meanwhile: one message
                while not request.tokens.empty():
                    items.append(request.tokens.get_nowait())
                ended = items[-1] is _END or isinstance(items[-1], BaseException)
                pieces: list[list[int]] = [[] for _ in range(sampling.n)]
                for choice, token in items[:-1] if ended else items:
                    pieces[choice].append(token)
                if any(pieces):
                    sent = clock()
                    yield pieces
                if isinstance(items[-1], BaseException):
                    raise items[-1]
                if ended:
                    return
        finally:
            self._leave(request)

    def _leave(self, request: _Request) -> None:
        request.gone = True
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            for row_id in request.row_ids:
                if row_id in self.live:
                    del self.live[row_id]
                    self.leaving.append(row_id)

    # -------------------------------------------------------------------------
    # the decode loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting and not self.live:
                self._wake.clear()
                await self._wake.wait()
            for row_id in self.leaving:
                self.batch.remove(row_id)
            self.leaving.clear()
            joining = self._joining = []
            rows = len(self.batch)
            while self.waiting and rows + self.waiting[0].sampling.n <= self.max_batch:
                joining.append(self.waiting.popleft())
                rows += joining[-1].sampling.n
            self.step_started = time.monotonic()
            try:
                row_ids, out = await loop.run_in_executor(self._executor, self._step, joining)
            except Exception as error:  # a failed forward ends every request in it, not the server
                self.failures_in_a_row, self.last_error = self.failures_in_a_row + 1, error
                self._fail_all(joining, error)
                continue
            finally:
                self._joining = []
                self.step_started = None
            self.failures_in_a_row = 0
            for request, ids in zip(joining, row_ids):
                request.row_ids, request.open = ids, len(ids)
                self.live.update((row_id, (request, choice)) for choice, row_id in enumerate(ids))
                if request.gone:  # left while its prefill ran
                    self._leave(request)
            self._dispatch(out)

    def _step(self, joining: list[_Request]) -> tuple[list[list[int]], dict[int, Generated]]:
        """Worker thread: prefill the newcomers (once per request, n rows each), then one decode
        step for every row."""
        with self.device_context():
            row_ids = [self.batch.add(r.prompt, r.sampling.n, r.sampling.max_tokens, r.sampling.temperature,
                                      r.sampling.top_k, r.sampling.seed, r.sampling.top_p) for r in joining]
            return row_ids, self.batch.step()

    async def run(self, fn: Callable, *args):
        """fn(*args) on the decode thread, between steps, under the device context: other model
        work (scoring a prompt) never runs beside a step."""
        def call():
            with self.device_context():
                return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _dispatch(self, out: dict[int, Generated]) -> None:
        self.steps += 1
        self.tokens_generated += len(out)  # one token per row per step
        self.on_step(len(out))
        for row_id, generated in out.items():
            entry = self.live.get(row_id)
            if entry is None:  # its client left during this step
                if generated.done:  # the step already dropped the row
                    self.leaving.remove(row_id)
                continue
            request, choice = entry
            request.tokens.put_nowait((choice, generated.token))
            if generated.done:
                del self.live[row_id]
                request.open -= 1
                if request.open == 0:
                    request.tokens.put_nowait(_END)
                    request.ended = True

    def _fail_all(self, joining: list[_Request], error: Exception) -> None:
        for request in dict.fromkeys([*joining, *(r for r, _ in self.live.values())]):
            request.tokens.put_nowait(error)
            request.ended = True
        self.live.clear()
        self.leaving.clear()
        for row in list(self.batch.rows):
            self.batch.remove(row.id)
