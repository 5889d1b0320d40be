"""
The chat server on Ray Serve: an OpenAI-compatible API, the web UI, continuous batching.

    serve run serve.app:app                                  # latest sft checkpoint, 127.0.0.1:8000
    serve run serve.app:build_app stage=mid step=500 max_batch=16 num_gpus=1
    serve deploy serve/config.yaml                           # on a running cluster (see README)

Two deployments:
- `ChatModel` owns the model and one `Batcher` (serve/batcher.py) per replica: concurrent
  requests decode together, one forward per step. GPU per replica when `num_gpus` is set;
  `num_replicas` may be "auto" for autoscaling. It streams a request's events in ticks: the
  tokens of `stream_interval_s` make one message to the ingress and one write to the client,
  since each message costs CPU in three processes (model, ingress, proxy) that the forward needs.
- `ChatAPI` is the FastAPI ingress: authentication, validation (serve/api.py), server-sent
  events, the web page, /v1/models, /health, /stats. It holds no model and scales apart.

Set NANOCHAT_API_KEY in the environment that builds the app to require
`Authorization: Bearer <key>` on the API (set but empty is an error, not "no key"). Every chat
request must be JSON from no other origin, its body is refused past 1 MB while it is read, and it
ends with 504 after request_timeout_s. A model replica whose decode loop is stuck, or whose last
steps all failed, reports itself unhealthy, and Serve replaces it.

Run by: python jobs/serve.py (or serve run serve.app:app).
"""

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.util import metrics

from nanochat_ray.checkpoint import build_model_from_checkpoint, checkpoint_dir, resolve_model_tag, step_name
from nanochat_ray.common import autocast, base_dir, compute_dtype, default_device, default_tokenizer_dir
from nanochat_ray.tokenizer import Tokenizer
from serve import api
from serve.batcher import Batcher, Overloaded, Sampling
from serve.completions import Scored, characters, parse_completion_request, prompt_ids, score
from serve.completions import completion as completion_body
from nanochat_ray.detokenizer import TextStream

STATIC = Path(__file__).resolve().parent / "static"
HEALTH_TIMEOUT_S = 2  # a model replica that does not answer in this long is not serving
logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
FAILED_STEPS_UNHEALTHY = 5  # decode steps failing in a row (every request in them got an error)


class AppArgs(BaseModel):
    """What `serve run serve.app:build_app key=value ...` and serve/config.yaml may set."""

    stage: Literal["base", "mid", "sft", "rl"] = "sft"
    model_tag: str | None = None  # e.g. d20; default: the stage's only trained model (else an error at start)
    step: int | None = None  # checkpoint step; default: the latest
    root: str | None = None  # artifact root; default: NANOCHAT_BASE_DIR
    tokenizer_dir: str | None = None  # default: <root>/tokenizer
    max_batch: int = Field(32, ge=1)  # rows decoded together per replica
    max_queue: int = Field(64, ge=0)  # requests waiting for a row per replica; one more gets 429
    num_replicas: int | Literal["auto"] = 1  # "auto": autoscaling
    num_gpus: float = Field(0, ge=0)  # per model replica
    num_cpus: float = Field(1, ge=0)  # per model replica (torch uses this many threads)
    request_timeout_s: float = Field(600, gt=0)  # a chat request's whole life, queue included; then 504
    stuck_after_s: float = Field(120, gt=0)  # one decode step running longer: the replica is unhealthy
    stream_interval_s: float = Field(0.05, ge=0, le=1)  # a stream's tokens this close together go out as one message
    dtype: Literal["auto", "float32", "bfloat16"] | None = None  # default: the dtype the checkpoint's run trained in


# -----------------------------------------------------------------------------
# metrics (Ray metrics: the dashboard and Prometheus); created in the replica that uses them

_metrics: dict = {}


def metric(name: str):
    if not _metrics:
        seconds = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]
        _metrics.update(
            requests=metrics.Counter("nanochat_serve_requests", "chat requests received", tag_keys=("route",)),
            errors=metrics.Counter("nanochat_serve_errors", "requests answered with an error", tag_keys=("code",)),
            tokens=metrics.Counter("nanochat_serve_generated_tokens", "tokens generated, all rows"),
            ttft=metrics.Histogram("nanochat_serve_time_to_first_token_seconds", "request to first token", seconds),
            latency=metrics.Histogram("nanochat_serve_request_seconds", "request to last token", seconds),
            batch=metrics.Histogram("nanochat_serve_batch_size", "rows per decode step", [1, 2, 4, 8, 16, 32, 64, 128]),
            waiting=metrics.Gauge("nanochat_serve_waiting_requests", "requests waiting for a row"),
        )
    return _metrics[name]


# -----------------------------------------------------------------------------


@serve.deployment
class ChatModel:
    """One model and its decode loop; yields event dicts for the ingress to format."""

    def __init__(self, args: AppArgs):
        self.device = default_device()
        tag = args.model_tag  # build_app resolved it
        root = Path(args.root) if args.root else base_dir()
        model, meta = build_model_from_checkpoint(args.stage, tag, args.step, self.device, root)
        model.eval()
        self.tokenizer = Tokenizer.from_directory(args.tokenizer_dir or default_tokenizer_dir(root))
        self.name = f"nanochat-{args.stage}-{tag}-step{meta['step']}"
        self.context = model.config.sequence_len
        # as the checkpoint's run computed (a smoke model in fp32, the cpu preset in bf16 where the CPU
        # has it): what the model was evaluated with is what it serves
        dtype = compute_dtype(args.dtype or meta.get("config", {}).get("dtype", "auto"), self.device)
        self.model = model
        self.created = int((checkpoint_dir(args.stage, tag, root) / step_name(meta["step"]) / "meta.json").stat().st_mtime)
        self.batcher = Batcher(model, self.tokenizer, args.max_batch, args.max_queue,
                               device_context=lambda: autocast(self.device, dtype), on_step=self._on_step,
                               interval_s=args.stream_interval_s)
        self.stuck_after_s, self.max_failures = args.stuck_after_s, FAILED_STEPS_UNHEALTHY

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace this replica."""
        if problem := self.batcher.health(self.stuck_after_s, self.max_failures):
            raise RuntimeError(problem)

    def _on_step(self, batch_size: int) -> None:
        metric("batch").observe(batch_size)
        metric("tokens").inc(batch_size)
        metric("waiting").set(len(self.batcher.waiting))

    def info(self) -> dict:
        return {"name": self.name, "context": self.context, "device": str(self.device), "created": self.created,
                "max_batch": self.batcher.max_batch}

    def stats(self) -> dict:
        return {**self.info(), **self.batcher.stats()}

    async def generate(self, messages: list[dict], max_tokens: int, temperature: float, top_k: int | None,
                       seed: int | None, stop: list[str], n: int = 1, top_p: float | None = None,
                       logprobs: int | None = None) -> AsyncIterator[list[dict]]:
        """The assistant's answers to a conversation: `complete`'s ticks, chat-shaped logprobs."""
        try:
            prompt = self.tokenizer.render_for_completion(
                {"messages": messages + [{"role": "assistant", "content": ""}]})
        except ValueError as error:
            yield [{"error": 400, "message": str(error), "param": "messages"}]
            return
        async for tick in self.complete(prompt, max_tokens, temperature, top_k, seed, stop, n, top_p, logprobs,
                                        chat=True):
            yield tick

    async def complete(self, prompt: str | list[int], max_tokens: int, temperature: float, top_k: int | None,
                       seed: int | None, stop: list[str], n: int = 1, top_p: float | None = None,
                       logprobs: int | None = None, echo: bool = False, chat: bool = False
                       ) -> AsyncIterator[list[dict]]:
        """n choices for one prompt (serve/completions.py says how prompts become ids).

        Yields ticks, lists of events: first [{"error": status, ...}] or [{"prompt_tokens",
        "prompt_text"}]; then {"index", "text"} pieces, those of one batcher interval in one tick;
        then per choice {"index", "finish_reason", "completion_tokens", "logprobs"}. logprobs
        (top-k count, or None for none): scored by one forward over the prompt and the answer once
        it is complete, so they are exactly the model's.
        """
        start = time.perf_counter()
        ids, unscored = prompt_ids(prompt, self.tokenizer) if not chat else (prompt, 0)
        if max(ids) >= self.tokenizer.vocab_size:
            yield [{"error": 400, "param": "prompt", "message": f"token id {max(ids)} is outside the vocabulary "
                                                                f"(0 to {self.tokenizer.vocab_size - 1})"}]
            return
        if n > self.batcher.max_batch:
            yield [{"error": 400, "param": "n", "message": f"n={n}: this server decodes at most "
                                                           f"{self.batcher.max_batch} rows at once"}]
            return
        room = self.context - len(ids)
        if room < (1 if max_tokens else 0):
            what = "conversation" if chat else "prompt"
            yield [{"error": 400, "param": "messages" if chat else "prompt", "code": "context_length_exceeded",
                    "message": f"the {what} is {len(ids):,} tokens; this model's context is {self.context:,} "
                               f"tokens{' and the answer needs at least 1' if max_tokens else ''}: shorten it"}]
            return
        texts = [TextStream(self.tokenizer, stop) for _ in range(n)]
        answers: list[list[int]] = [[] for _ in range(n)]
        reported = ids[unscored:]
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(reported)
        if max_tokens == 0:
            yield [{"prompt_tokens": len(ids), "prompt_text": prompt_text}]
        else:
            seed = random.getrandbits(62) if seed is None else seed
            tokens = self.batcher.stream(ids, Sampling(min(max_tokens, room), temperature, top_k, seed, top_p, n))
            try:
                try:
                    await tokens.__anext__()  # queued, or refused
                except Overloaded as error:
                    yield [{"error": 429, "message": str(error), "retry_after": error.retry_after}]
                    return
                yield [{"prompt_tokens": len(ids), "prompt_text": prompt_text}]
                first = True
                async for pieces in tokens:
                    if first:
                        metric("ttft").observe(time.perf_counter() - start)
                        first = False
                    tick = []
                    for i, piece in enumerate(pieces):
                        used = texts[i].tokens
                        delta = texts[i].feed(piece)
                        answers[i] += piece[:texts[i].tokens - used]
                        if delta:
                            tick.append({"index": i, "text": delta})
                    if tick:
                        yield tick
                    if all(text.stopped for text in texts):
                        break
            finally:
                await tokens.aclose()  # a client that left, or stop strings: free the rows now
        tick = [{"index": i, "text": delta} for i, text in enumerate(texts) if (delta := text.flush())]
        metric("latency").observe(time.perf_counter() - start)
        for i, (text, answer) in enumerate(zip(texts, answers)):
            answer = [t for t in answer if t not in text.terminal]
            scored = None
            if logprobs is not None:
                scored = await self._logprobs(ids, answer, unscored, logprobs, echo, chat)
            tick.append({"index": i, "finish_reason": "stop" if text.stopped else "length",
                         "completion_tokens": text.tokens, "logprobs": scored})
        yield tick

    async def _logprobs(self, ids: list[int], answer: list[int], unscored: int, top: int, echo: bool,
                        chat: bool) -> dict:
        sequence = ids + answer
        first = max(1, unscored) if echo else len(ids)  # the first position reported with a score
        scores = await self.batcher.run(score, self.model, sequence, first, top) if first < len(sequence) else []
        if echo:  # the prompt as the client sent it (a string's <|bos|> is ours), then the answer
            shown, unscored_shown, offset = sequence[unscored:], first - unscored, 0
        else:
            shown, unscored_shown, offset = answer, 0, characters(self.tokenizer, ids[unscored:])
        scored = Scored(self.tokenizer, shown, scores, unscored_shown, offset)
        return scored.chat() if chat else scored.legacy()


# -----------------------------------------------------------------------------

web = FastAPI(title="nanochat-ray", docs_url=None, redoc_url=None)


@web.exception_handler(api.ApiError)
async def _api_error(request: Request, error: api.ApiError) -> JSONResponse:
    metric("errors").inc(tags={"code": str(error.status)})
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


@contextlib.contextmanager
def _busy_is_429() -> Iterator[None]:
    """Serve's BackPressureError (the model replicas' queues are full), raised by the call or while
    awaiting it, as the 429 our own full queue gives; unhandled, Serve would answer 503."""
    try:
        yield
    except BackPressureError as error:
        raise api.ApiError(429, f"server busy: {error}", retry_after=RETRY_AFTER_S) from None


async def _first_event(generator: DeploymentResponseGenerator, ticks: AsyncIterator[list[dict]]) -> dict:
    """The model's first event from `ticks` (the generator's, under the request's deadline): the
    request was queued, or its 4xx/429/504 as an ApiError."""
    try:
        with _busy_is_429():
            [first] = await anext(ticks)
    except api.ApiError:
        generator.cancel()
        raise
    if "error" in first:
        raise api.ApiError(first["error"], first["message"], first.get("param"), first.get("code"),
                           first.get("retry_after"))
    return first


async def _collect(generator: DeploymentResponseGenerator, ticks: AsyncIterator[list[dict]], n: int) -> list[dict]:
    """A whole answer: per choice {"text", "finish_reason", "completion_tokens", "logprobs"}."""
    choices = [{"text": ""} for _ in range(n)]
    try:
        async for tick in ticks:
            for event in tick:
                if "text" in event:
                    choices[event["index"]]["text"] += event["text"]
                else:
                    choices[event["index"]].update(event)
    finally:
        generator.cancel()
    return choices


def _text_chunk(id_: str, model: str, index: int, text: str, finish_reason: str | None = None,
                usage: dict | None = None) -> dict:
    body = {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    return {**body, "usage": usage} if usage is not None else body


def _stream_error(request: Request, error: Exception) -> dict:
    logger.error("stream of %s failed", request.url.path, exc_info=error)
    metric("errors").inc(tags={"code": "500"})
    return api.ApiError(500, "generation failed; the error has been logged").body()


@web.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Anything unexpected: logged here in full, answered without paths, processes or traceback."""
    logger.error("request %s %s failed", request.method, request.url.path, exc_info=error)
    metric("errors").inc(tags={"code": "500"})
    return JSONResponse(api.ApiError(500, "internal error: the server failed to answer this request; "
                                          "it has been logged").body(), status_code=500)


@serve.deployment(max_ongoing_requests=1000)  # the ingress only awaits: many requests per replica
@serve.ingress(web)
class ChatAPI:
    def __init__(self, model: DeploymentHandle, api_key: str | None = None, request_timeout_s: float = 600):
        self.model = model.options(stream=True)
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self._info: dict | None = None

    @property
    def _replica(self) -> DeploymentHandle:
        return self.model.options(stream=False)

    async def info(self) -> dict:
        if self._info is None:
            with _busy_is_429():
                self._info = await self._replica.info.remote()
        return self._info

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise api.ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key")

    # --- pages and status

    @web.get("/")
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @web.get("/health")
    async def health(self) -> JSONResponse:
        """200 once a model replica answers; 503 while none does (starting, or failing to start)."""
        try:
            info = await asyncio.wait_for(self._replica.info.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # no replica yet, or its constructor failed: Serve's reason is in its logs
            return JSONResponse({"status": "unavailable", "detail": "no model replica is serving yet"},
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok", "model": info["name"]})

    @web.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        info = await self.info()
        return {"object": "list", "data": [{"id": info["name"], "object": "model", "created": info["created"],
                                            "owned_by": "nanochat-ray", "context_length": info["context"]}]}

    @web.get("/stats")
    async def stats(self, request: Request) -> dict:
        """One model replica's queue and batch (the one the router picked)."""
        self._authorize(request)
        with _busy_is_429():
            return await self._replica.stats.remote()

    # --- chat

    async def _start(self, request: Request, route: str
                     ) -> tuple[api.ChatRequest, DeploymentResponseGenerator, AsyncIterator[dict], int]:
        """Validate and queue a request; errors here become 4xx before any byte is streamed.
        Returns the model's generator (to cancel) and its ticks under the request's deadline."""
        metric("requests").inc(tags={"route": route})
        api.check_browser_request(request.headers)
        self._authorize(request)
        chat = api.parse_chat_request(await api.read_body(request.stream(), request.headers))
        top = (chat.top_logprobs or 0) if chat.logprobs else None
        with _busy_is_429():
            generator = self.model.generate.remote(chat.conversation(), chat.token_budget(), chat.temperature,
                                                   chat.top_k, chat.seed, chat.stop_strings(), chat.n, chat.top_p, top)
        ticks = api.within(generator, self.request_timeout_s)
        return chat, generator, ticks, (await _first_event(generator, ticks))["prompt_tokens"]

    @web.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        chat, generator, ticks, prompt_tokens = await self._start(request, "/v1/chat/completions")
        name, id_ = (await self.info())["name"], api.completion_id()
        if not chat.stream:
            choices = await _collect(generator, ticks, chat.n)
            return api.completion(id_, name, choices, prompt_tokens, sum(c["completion_tokens"] for c in choices))

        async def sse() -> AsyncIterator[str]:
            try:
                for i in range(chat.n):
                    yield api.chunk(id_, name, {"role": "assistant", "content": ""}, index=i)
                used, ended = 0, 0
                async for tick in ticks:  # one write per tick: one message to the proxy
                    chunks = []
                    for event in tick:
                        if "text" in event:
                            chunks.append(api.chunk(id_, name, {"content": event["text"]}, index=event["index"]))
                        else:
                            used, ended = used + event["completion_tokens"], ended + 1
                            chunks.append(api.chunk(id_, name, {}, event["finish_reason"], index=event["index"],
                                                    usage_=api.usage(prompt_tokens, used) if ended == chat.n else None))
                    yield "".join(chunks)
                yield api.sse("[DONE]")
            except Exception as error:  # the status line is sent: the error goes in the stream
                yield api.sse(_stream_error(request, error))
            finally:
                generator.cancel()  # the client left: stop the model's rows now

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @web.post("/v1/completions")
    async def completions(self, request: Request):
        """Text completions: a prompt or a batch of them, n choices each (index = prompt × n + choice)."""
        metric("requests").inc(tags={"route": "/v1/completions"})
        api.check_browser_request(request.headers)
        self._authorize(request)
        body = parse_completion_request(await api.read_body(request.stream(), request.headers))
        prompts = body.prompts()
        seed = random.getrandbits(62) if body.seed is None else body.seed
        generators = []
        try:
            with _busy_is_429():
                for k, p in enumerate(prompts):
                    generators.append(self.model.complete.remote(
                        p, body.max_tokens, body.temperature, body.top_k, seed + k * body.n, body.stop_strings(),
                        body.n, body.top_p, body.logprobs, body.echo))
            runs = [(generator, api.within(generator, self.request_timeout_s)) for generator in generators]
            firsts = [await _first_event(*run) for run in runs]  # every error before any answer
        except BaseException:
            for generator in generators:
                generator.cancel()
            raise
        name, id_ = (await self.info())["name"], "cmpl-" + api.completion_id().removeprefix("chatcmpl-")
        prompt_tokens = sum(f["prompt_tokens"] for f in firsts)
        echo = [f["prompt_text"] if body.echo else "" for f in firsts]
        if not body.stream:
            per_prompt = await asyncio.gather(*(_collect(*run, body.n) for run in runs))
            choices = [{**c, "text": echo[k] + c["text"]} for k, cs in enumerate(per_prompt) for c in cs]
            return completion_body(id_, name, choices, prompt_tokens, sum(c["completion_tokens"] for c in choices))

        async def sse() -> AsyncIterator[str]:
            used, ended = 0, 0
            try:
                for k, (_, ticks) in enumerate(runs):  # prompt after prompt; all of them decode meanwhile
                    for i in range(body.n):
                        if echo[k]:
                            yield api.sse(_text_chunk(id_, name, k * body.n + i, echo[k]))
                    async for tick in ticks:
                        chunks = []
                        for event in tick:
                            index = k * body.n + event["index"]
                            if "text" in event:
                                chunks.append(api.sse(_text_chunk(id_, name, index, event["text"])))
                            else:
                                used, ended = used + event["completion_tokens"], ended + 1
                                last = ended == len(runs) * body.n
                                chunks.append(api.sse(_text_chunk(id_, name, index, "", event["finish_reason"],
                                                                  api.usage(prompt_tokens, used) if last else None)))
                        yield "".join(chunks)
                yield api.sse("[DONE]")
            except Exception as error:  # the status line is sent: the error goes in the stream
                yield api.sse(_stream_error(request, error))
            finally:
                for generator in generators:
                    generator.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @web.post("/chat/completions")
    async def chat_completions_reference(self, request: Request):
        """The reference's shape: `data: {"token": ...}` events, then `data: {"done": true}`."""
        _, generator, ticks, _ = await self._start(request, "/chat/completions")

        async def sse() -> AsyncIterator[str]:
            try:
                async for tick in ticks:
                    if text := "".join(api.sse({"token": event["text"]}) for event in tick if "text" in event):
                        yield text
                yield api.sse({"done": True})
            finally:
                generator.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -----------------------------------------------------------------------------


def api_key_from_env() -> str | None:
    """NANOCHAT_API_KEY: unset means no key; set but blank is a mistake (an empty secret in a
    deploy config), refused rather than silently serving without authentication."""
    key = os.environ.get("NANOCHAT_API_KEY")
    if key is not None and not key.strip():
        raise ValueError("NANOCHAT_API_KEY is set but empty: set it to a secret to require "
                         "`Authorization: Bearer <key>`, or unset it to serve without a key")
    return key


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A loud warning when the API listens beyond this machine with no key; None otherwise."""
    if api_key is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name other than localhost: it may resolve to anything
        pass
    return (f"WARNING: serving on {host} with no API key: anyone who can reach this address can use the "
            f"model and its compute. Set NANOCHAT_API_KEY=<secret> (clients send `Authorization: Bearer "
            f"<secret>`), or bind 127.0.0.1.")


def build_app(args: dict | AppArgs) -> serve.Application:
    """The application for `serve run` / `serve deploy`; see AppArgs for the settings."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    api_key = api_key_from_env()
    # fail here, before any replica starts, when there is no such model (CheckpointError says
    # which exist and how to pick one)
    args = args.model_copy(update={"model_tag": resolve_model_tag(args.stage, args.model_tag, args.root)})
    model = ChatModel.options(
        num_replicas=args.num_replicas,
        # our own queue answers 429 when full, so Serve must let that many requests in
        max_ongoing_requests=args.max_batch + args.max_queue + 8,
        # Serve's router queue only bounds a burst that is still being assigned to replicas (a burst
        # of 16 against 6 places filled it and got Serve's 503s): our own queue is the admission
        # control, so the router's is a wide safety net
        max_queued_requests=2 * (args.max_batch + args.max_queue) + 16,
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
    ).bind(args)
    return ChatAPI.bind(model, api_key, args.request_timeout_s)


def __getattr__(name: str):
    # `serve run serve.app:app`: built on first use, so importing this module needs no checkpoint
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
