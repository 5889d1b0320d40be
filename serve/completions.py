"""
The OpenAI text-completions API (/v1/completions) and the log-probabilities both APIs report.
Plain pydantic and torch, no Ray; serve/app.py wires it to the model.

    request = parse_completion_request(body_bytes)     # ApiError(4xx) naming the field at fault
    prompts = request.prompt_ids(tokenizer)             # one token list per prompt of the batch
    scores = score(model, ids, start=1, top=5)          # log p(ids[t] | ids[:t]) for t >= start

A string prompt is scored after <|bos|>, as every training document starts (so its first token
gets a log-probability too); a token-id prompt is taken exactly as given, and its first token has
none. Log-probabilities are the model's own (softmax of its logits), whatever temperature, top_k
or top_p the sampling used.
"""

import time
from typing import Annotated

import torch
from pydantic import Field, model_validator

from nanochat_ray.gpt import GPT
from nanochat_ray.tokenizer import SPECIAL_TOKENS, Tokenizer
from serve.api import MAX_CHOICES, MAX_TOTAL_CHARS, MAX_TOP_LOGPROBS, StreamOptions, _Strict, parse_request, usage

MAX_PROMPTS = 64  # prompts in one batch
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Strict):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0, le=4096)] = DEFAULT_MAX_TOKENS  # 0: score the prompt only
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=1, le=200)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        texts = [self.prompt] if isinstance(self.prompt, str) else [p for p in self.prompt if isinstance(p, str)]
        if sum(map(len, texts)) > MAX_TOTAL_CHARS:
            raise ValueError(f"the prompts have more than {MAX_TOTAL_CHARS:,} characters in total")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 returns nothing without echo: ask for echo, or at least 1 token")
        if self.logprobs is not None and self.stream:
            raise ValueError("logprobs are only returned without stream: ask with stream false")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def parse_completion_request(body: bytes) -> CompletionRequest:
    return parse_request(body, CompletionRequest, "prompt")


def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer) -> tuple[list[int], int]:
    """(ids to run, how many leading ids the client did not send: the <|bos|> before a string)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, prepend="<|bos|>"), 1
    return list(prompt), 0


# -----------------------------------------------------------------------------
# log-probabilities


@torch.inference_mode()
def score(model: GPT, ids: list[int], start: int, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each t in [start, len(ids)): (log p(ids[t] | ids[:t]), the `top` likeliest (id, log p))."""
    assert start >= 1, "the first token has no context to be scored in"
    logits = model(torch.tensor([ids[:-1]], device=model.lm_head.weight.device))[0, start - 1:]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(ids[start:], device=logprobs.device)[:, None])[:, 0].tolist()
    if top == 0:
        return [(lp, []) for lp in chosen]
    values, indices = logprobs.topk(top, dim=-1)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(chosen, indices.tolist(), values.tolist())]


def _byte_decoder() -> dict[str, int]:
    # byte-level BPE spells each byte as one printable character: printable Latin-1 bytes as
    # themselves, the other bytes as chr(256 + k) in byte order
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(rest)}}


_BYTES = _byte_decoder()


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The UTF-8 bytes one token stands for (a special token: its name)."""
    piece = tokenizer.id_to_token(token)
    return piece.encode() if piece in SPECIAL_TOKENS else bytes(_BYTES[c] for c in piece)


def characters(tokenizer: Tokenizer, ids: list[int]) -> int:
    """How many characters the tokens' text adds: one per UTF-8 byte that starts a character."""
    return sum(1 for t in ids for b in token_bytes(tokenizer, t) if b & 0xC0 != 0x80)


class Scored:
    """One sequence's scored tokens: text pieces, offsets and log-probabilities in both shapes."""

    def __init__(self, tokenizer: Tokenizer, ids: list[int], scores: list[tuple[float, list[tuple[int, float]]]],
                 unscored: int, text_offset: int = 0):
        """`ids` are the reported tokens; the first `unscored` of them have no log-probability
        (scores covers the rest). Offsets count characters from `text_offset`."""
        self.tokenizer, self.ids, self.unscored = tokenizer, ids, unscored
        self.scores = [None] * unscored + scores
        self.offsets, offset = [], text_offset
        for token in ids:
            self.offsets.append(offset)
            offset += characters(tokenizer, [token])

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def legacy(self) -> dict:
        """/v1/completions' `logprobs` object."""
        top = [None if s is None else {self._text(t): lp for t, lp in s[1]} for s in self.scores]
        return {"tokens": [self._text(t) for t in self.ids], "token_logprobs": [s and s[0] for s in self.scores],
                "top_logprobs": top, "text_offset": self.offsets}

    def chat(self) -> dict:
        """/v1/chat/completions' `logprobs` object (`content`: one entry per answer token)."""
        def entry(token: int, lp: float) -> dict:
            return {"token": self._text(token), "logprob": lp, "bytes": list(token_bytes(self.tokenizer, token))}
        return {"content": [{**entry(t, s[0]), "top_logprobs": [entry(i, lp) for i, lp in s[1]]}
                            for t, s in zip(self.ids, self.scores) if s is not None]}


def completion(id_: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """choices: {"text", "finish_reason", "logprobs"} in index order."""
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": c["text"], "logprobs": c.get("logprobs"),
                         "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}
