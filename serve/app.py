"""
The chat server on Ray Serve: an OpenAI-compatible API, the web UI, continuous batching.

    serve run serve.app:app                                  # latest sft checkpoint, 127.0.0.1:8000
    serve run serve.app:build_app stage=mid step=500 max_batch=16 num_gpus=1
    serve deploy serve/config.yaml                           # on a running cluster (see README)

Two deployments:
- `ChatModel` owns the model and one `Batcher` (serve/batcher.py) per replica: concurrent
  requests decode together, one forward per step. GPU per replica when `num_gpus` is set;
  `num_replicas` may be "auto" for autoscaling.
- `ChatAPI` is the FastAPI ingress: authentication, validation (serve/api.py), server-sent
  events, the web page, /v1/models, /health, /stats. It holds no model and scales apart.

Set NANOCHAT_API_KEY in the environment that builds the app to require
`Authorization: Bearer <key>` on the API (set but empty is an error, not "no key"). Every chat
request must be JSON from no other origin, its body is refused past 1 MB while it is read, and it
ends with 504 after request_timeout_s. A model replica whose decode loop is stuck, or whose last
steps all failed, reports itself unhealthy, and Serve replaces it.
"""

import hmac
import ipaddress
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.util import metrics

from nanochat_ray.checkpoint import build_model_from_checkpoint
from nanochat_ray.common import autocast, base_dir, compute_dtype, default_device
from nanochat_ray.config import default_preset, make_config
from nanochat_ray.tokenizer import Tokenizer
from serve import api
from serve.batcher import Batcher, Overloaded, Sampling
from serve.text import TextStream

STATIC = Path(__file__).resolve().parent / "static"
RETRY_AFTER_S = 1
FAILED_STEPS_UNHEALTHY = 5  # decode steps failing in a row (every request in them got an error)


class AppArgs(BaseModel):
    """What `serve run serve.app:build_app key=value ...` and serve/config.yaml may set."""

    stage: Literal["base", "mid", "sft", "rl"] = "sft"
    model_tag: str | None = None  # e.g. d20; default: the default preset's (d20 with a GPU, else d4)
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
        tag = args.model_tag or make_config(default_preset()).model_tag
        root = Path(args.root) if args.root else base_dir()
        model, meta = build_model_from_checkpoint(args.stage, tag, args.step, self.device, root)
        model.eval()
        self.tokenizer = Tokenizer.from_directory(args.tokenizer_dir or root / "tokenizer")
        self.name = f"nanochat-{args.stage}-{tag}-step{meta['step']}"
        self.context = model.config.sequence_len
        dtype = compute_dtype("auto", self.device)
        self.batcher = Batcher(model, self.tokenizer, args.max_batch, args.max_queue,
                               device_context=lambda: autocast(self.device, dtype), on_step=self._on_step)
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
        return {"name": self.name, "context": self.context, "device": str(self.device),
                "max_batch": self.batcher.max_batch}

    def stats(self) -> dict:
        return {**self.info(), **self.batcher.stats()}

    async def generate(self, messages: list[dict], max_tokens: int, temperature: float, top_k: int | None,
                       seed: int | None, stop: list[str]) -> AsyncIterator[dict]:
        """Events: first {"error": status, ...} or {"prompt_tokens": n}; then {"text": delta} pieces;
        last {"finish_reason", "completion_tokens"}."""
        start = time.perf_counter()
        try:
            prompt = self.tokenizer.render_for_completion(
                {"messages": messages + [{"role": "assistant", "content": ""}]})
        except ValueError as error:
            yield {"error": 400, "message": str(error), "param": "messages"}
            return
        room = self.context - len(prompt)
        if room < 1:
            yield {"error": 400, "param": "messages", "code": "context_length_exceeded",
                   "message": f"the conversation is {len(prompt):,} tokens; this model's context is "
                              f"{self.context:,} tokens and the answer needs at least 1: shorten the messages"}
            return
        budget = min(max_tokens, room)
        seed = random.getrandbits(62) if seed is None else seed
        tokens = self.batcher.stream(prompt, Sampling(budget, temperature, top_k, seed))
        text = TextStream(self.tokenizer, stop)
        try:
            try:
                await tokens.__anext__()  # queued, or refused
            except Overloaded as error:
                yield {"error": 429, "message": str(error), "retry_after": error.retry_after}
                return
            yield {"prompt_tokens": len(prompt)}
            first = True
            async for ids in tokens:
                if first:
                    metric("ttft").observe(time.perf_counter() - start)
                    first = False
                delta = text.feed(ids)
                if delta:
                    yield {"text": delta}
                if text.stopped:
                    break
            delta = text.flush()
            if delta:
                yield {"text": delta}
            metric("latency").observe(time.perf_counter() - start)
            yield {"finish_reason": "stop" if text.stopped else "length", "completion_tokens": text.tokens}
        finally:
            await tokens.aclose()  # a client that left, or a stop string: free the row now


# -----------------------------------------------------------------------------

web = FastAPI(title="nanochat-ray", docs_url=None, redoc_url=None)


@web.exception_handler(api.ApiError)
async def _api_error(request: Request, error: api.ApiError) -> JSONResponse:
    metric("errors").inc(tags={"code": str(error.status)})
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


@serve.deployment(max_ongoing_requests=1000)  # the ingress only awaits: many requests per replica
@serve.ingress(web)
class ChatAPI:
    def __init__(self, model: DeploymentHandle, api_key: str | None = None, request_timeout_s: float = 600):
        self.model = model.options(stream=True)
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self._info: dict | None = None

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.model.options(stream=False).info.remote()
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
    async def health(self) -> dict:
        return {"status": "ok"}

    @web.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        info = await self.info()
        return {"object": "list", "data": [{"id": info["name"], "object": "model", "created": 0,
                                            "owned_by": "nanochat-ray", "context_length": info["context"]}]}

    @web.get("/stats")
    async def stats(self, request: Request) -> dict:
        """One model replica's queue and batch (the one the router picked)."""
        self._authorize(request)
        return await self.model.options(stream=False).stats.remote()

    # --- chat

    async def _start(self, request: Request, route: str
                     ) -> tuple[api.ChatRequest, DeploymentResponseGenerator, AsyncIterator[dict], int]:
        """Validate and queue a request; errors here become 4xx before any byte is streamed.
        Returns the model's generator (to cancel) and its events under the request's deadline."""
        metric("requests").inc(tags={"route": route})
        api.check_browser_request(request.headers)
        self._authorize(request)
        chat = api.parse_chat_request(await api.read_body(request.stream(), request.headers))
        generator = self.model.generate.remote(chat.conversation(), chat.token_budget(), chat.temperature,
                                               chat.top_k, chat.seed, chat.stop_strings())
        events = api.within(generator, self.request_timeout_s)
        try:
            first = await anext(events)
        except BackPressureError as error:
            generator.cancel()
            raise api.ApiError(429, f"server busy: {error}", retry_after=RETRY_AFTER_S) from None
        except api.ApiError:
            generator.cancel()
            raise
        if "error" in first:
            raise api.ApiError(first["error"], first["message"], first.get("param"), first.get("code"),
                               first.get("retry_after"))
        return chat, generator, events, first["prompt_tokens"]

    @web.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        chat, generator, events, prompt_tokens = await self._start(request, "/v1/chat/completions")
        name, id_ = (await self.info())["name"], api.completion_id()
        if not chat.stream:
            pieces, end = [], {}
            try:
                async for event in events:
                    if "text" in event:
                        pieces.append(event["text"])
                    else:
                        end = event
            finally:
                generator.cancel()
            return api.completion(id_, name, "".join(pieces), end["finish_reason"], prompt_tokens,
                                  end["completion_tokens"])

        async def sse() -> AsyncIterator[str]:
            try:
                yield api.chunk(id_, name, {"role": "assistant", "content": ""})
                async for event in events:
                    if "text" in event:
                        yield api.chunk(id_, name, {"content": event["text"]})
                    else:
                        yield api.chunk(id_, name, {}, event["finish_reason"],
                                        api.usage(prompt_tokens, event["completion_tokens"]))
                yield api.sse("[DONE]")
            except Exception as error:  # the status line is sent: the error goes in the stream
                metric("errors").inc(tags={"code": "500"})
                yield api.sse(api.ApiError(500, f"generation failed: {error}").body())
            finally:
                generator.cancel()  # the client left: stop the model's row now

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @web.post("/chat/completions")
    async def chat_completions_reference(self, request: Request):
        """The reference's shape: `data: {"token": ...}` events, then `data: {"done": true}`."""
        _, generator, events, _ = await self._start(request, "/chat/completions")

        async def sse() -> AsyncIterator[str]:
            try:
                async for event in events:
                    if "text" in event:
                        yield api.sse({"token": event["text"]})
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
    model = ChatModel.options(
        num_replicas=args.num_replicas,
        # our own queue answers 429 when full, so Serve must let that many requests in
        max_ongoing_requests=args.max_batch + args.max_queue + 8,
        # Serve's router queue: requests being assigned count too, so leave room beyond ours
        max_queued_requests=args.max_batch + args.max_queue,
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
    ).bind(args)
    return ChatAPI.bind(model, api_key_from_env(), args.request_timeout_s)


app = build_app({})
