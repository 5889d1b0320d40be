"""
Chat with a trained model in the terminal, tokens streamed as they are generated.

    python jobs/chat_cli.py                          # multi-turn with the latest sft model of the default preset
    python jobs/chat_cli.py -p "Why is the sky blue?"  # one answer, then exit
    python jobs/chat_cli.py --stage mid --preset cpu --temperature 0.8 --top-k 50
    python jobs/chat_cli.py --url http://127.0.0.1:8000    # talk to the chat server (serve/app.py)

With --url the answers come from the server's /v1/chat/completions (streamed); set
NANOCHAT_API_KEY when the server requires a key.

Type `quit` or an empty line with Ctrl-D to leave, `clear` to start a new conversation.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.checkpoint import build_model_from_checkpoint
from nanochat_ray.common import default_device, default_tokenizer_dir
from nanochat_ray.config import add_config_args, config_from_args
from nanochat_ray.detokenizer import TextStream
from nanochat_ray.engine import Engine
from nanochat_ray.tokenizer import Tokenizer


def reply(engine: Engine, tokenizer: Tokenizer, messages: list[dict], args: argparse.Namespace,
          write: Callable[[str], None]) -> str:
    """Stream one assistant answer to `write`; return its text."""
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    text = TextStream(tokenizer)  # each token decoded once; a character split over tokens waits for its end
    for column, _ in engine.generate(prompt, 1, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed):
        if delta := text.feed(column):
            write(delta)
        if text.stopped:
            break
    if rest := text.flush():
        write(rest)
    return text.text


def reply_remote(url: str, messages: list[dict], args: argparse.Namespace, write: Callable[[str], None]) -> str:
    """Stream one assistant answer from the chat server to `write`; return its text."""
    body = {"messages": messages, "stream": True, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "seed": args.seed}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("NANOCHAT_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['NANOCHAT_API_KEY']}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", json.dumps(body).encode(), headers)
    try:
        response = urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):  # not our JSON error body (a proxy in between, say)
            message = body.decode(errors="replace")[:200] or error.reason
        raise SystemExit(f"the server answered {error.code}: {message}") from None
    except urllib.error.URLError as error:
        raise SystemExit(f"cannot reach {url}: {error.reason}; is the server running (serve run serve.app:app)?") from None
    pieces = []
    with response:
        for line in response:  # server-sent events: `data: {...}` lines, then `data: [DONE]`
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise SystemExit(f"the server failed mid-answer: {chunk['error']['message']}")
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if piece:
                write(piece)
                pieces.append(piece)
    return "".join(pieces)


def main(argv: list[str] | None = None, read: Callable[[str], str] = input,
         write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["base", "mid", "sft", "rl"], default="sft")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: <base dir>/tokenizer")
    parser.add_argument("--url", default=None, help="chat server to talk to (e.g. http://127.0.0.1:8000) "
                        "instead of loading the model here")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.temperature <= 2 or not 1 <= args.top_k <= 200 or args.max_tokens < 1:
        parser.error("--temperature must lie in [0, 2], --top-k in [1, 200], --max-tokens ≥ 1")
    cfg = config_from_args(args)
    args.seed = cfg.seed
    if args.url:
        def answer(messages: list[dict]) -> str:
            return reply_remote(args.url, messages, args, write)
        banner = f"nanochat-ray at {args.url}"
    else:
        model, meta = build_model_from_checkpoint(args.stage, cfg.model_tag, args.step, default_device())
        model.eval()
        tokenizer = Tokenizer.from_directory(args.tokenizer_dir or default_tokenizer_dir())
        engine = Engine(model, tokenizer)

        def answer(messages: list[dict]) -> str:
            return reply(engine, tokenizer, messages, args, write)
        banner = f"nanochat-ray: {args.stage} {cfg.model_tag} step {meta['step']}"
    messages: list[dict] = []
    if args.prompt is not None:
        messages = [{"role": "user", "content": args.prompt}]
        messages.append({"role": "assistant", "content": answer(messages)})
        write("\n")
        return messages
    write(f"{banner}. `quit` to leave, `clear` to restart.\n")
    while True:
        try:
            text = read("\nUser: ").strip()
        except EOFError:
            break
        if text == "quit":
            break
        if text == "clear":
            messages = []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        write("Assistant: ")
        messages.append({"role": "assistant", "content": answer(messages)})
        write("\n")
    return messages


if __name__ == "__main__":
    main()
