"""
The OpenAI chat-completions wire format: request validation (SPEC §13 limits), error bodies,
response and stream-chunk shapes, and the guards every request passes (body size while reading,
browser origin, a deadline). Plain pydantic and asyncio, no Ray.

    check_browser_request(headers)                          # 415 / 403 for what a foreign page could send
    body = await read_body(request.stream(), headers)     # 413 as soon as the limit is passed
    request = parse_chat_request(body)                    # raises ApiError(400, ...) with the field at fault
    async for event in within(events, seconds): ...       # 504 when the deadline passes
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_BODY_BYTES = 1_000_000  # 32,000 characters, JSON-escaped, fit many times over
DEFAULT_MAX_TOKENS = 512
MAX_CHOICES = 8  # n: rows decoded from one prefill
MAX_TOP_LOGPROBS = 20
T = TypeVar("T")


class ApiError(Exception):
    """An error the client gets as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class _Strict(BaseModel):
    # strict: "0.5" is not a temperature and true is not a token count; forbid: a misspelt
    # field is an error, not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted for compatibility, not used

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @model_validator(mode="after")
    def _length(self) -> "Message":
        if len(self.text()) > MAX_MESSAGE_CHARS:
            raise ValueError(f"content has {len(self.text()):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None  # any name is accepted: this server serves one model
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=1, le=200)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # choices, decoded together from one prefill
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    user: str | None = None  # accepted for compatibility, not used

    @model_validator(mode="after")
    def _total(self) -> "ChatRequest":
        total = sum(len(m.text()) for m in self.messages)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"the messages have {total:,} characters in total; the limit is {MAX_TOTAL_CHARS:,}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logprobs and self.stream:
            raise ValueError("logprobs are only returned without stream: ask with stream false")
        return self

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


def check_browser_request(headers: Mapping[str, str]) -> None:
    """Refuse what a page on another site could make a visitor's browser send: a browser sends a
    cross-origin POST without asking first only with a form or text/plain body, and says where it
    came from in Origin. (Without an API key, this is all that keeps such a page off the API.)"""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be sent as Content-Type: application/json, got {kind or 'none'!r}")
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
        raise ApiError(403, f"requests from another origin ({origin}) are refused: this API serves "
                            f"its own page and non-browser clients")


def _too_big(size: str) -> ApiError:
    return ApiError(413, f"request body of {size} bytes; the limit is {MAX_BODY_BYTES:,}")


async def read_body(chunks: AsyncIterator[bytes], headers: Mapping[str, str]) -> bytes:
    """The request body, refused (413) as soon as it passes MAX_BODY_BYTES: a declared length is
    checked before reading, a chunked body while it arrives, so no client makes us hold more."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_big(f"{int(declared):,}")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_big(f"more than {MAX_BODY_BYTES:,}")
    return bytes(body)


async def within(events: AsyncIterator[T], seconds: float) -> AsyncIterator[T]:
    """`events`, as long as the whole request takes at most `seconds`; then ApiError(504)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                event = await anext(events)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ApiError(504, f"the request took longer than the server's limit of {seconds:g} s "
                                f"(request_timeout_s): ask for fewer max_tokens") from None
        yield event


def parse_chat_request(body: bytes) -> ChatRequest:
    return parse_request(body, ChatRequest, "messages")


def parse_request(body: bytes, model: type[BaseModel], required: str):
    """Any body (read_body has capped its size) → the validated request, or ApiError(4xx) naming
    the field at fault."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the body nests arrays or objects too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object with at least `{required}`")
    _check_strings(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None
    except RecursionError:
        raise ApiError(400, "the body nests arrays or objects too deeply") from None


def _check_strings(data) -> None:
    """JSON may spell lone surrogates ("\\ud800"), which no UTF-8 text holds and the tokenizer
    cannot take: refuse them by where they are. Iterative: nesting depth costs no stack."""
    todo = [(data, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, dict):
            todo.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
            todo.extend((k, path or "body") for k in value)
        elif isinstance(value, list):
            todo.extend((v, f"{path}.{i}") for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{path}: the string holds a lone UTF-16 surrogate (e.g. \\ud800), "
                                    "which is not text", param=path) from None


# -----------------------------------------------------------------------------
# responses


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id_: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """choices: {"text", "finish_reason"[, "logprobs"]} in order."""
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(id_: str, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None, index: int = 0) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
