"""
Load test of the chat server: C concurrent streaming clients on 127.0.0.1, R requests per level,
max_tokens 64; req/s, generated tok/s, time to first token and latency (p50/p99), errors, and
tok/s against C = 1 (the batching gain; target ≥ 4× at 16, SPEC §14 asks 8× the reference).

    python bench/serve_load.py                                  # own server: depth-4 model, random weights
    python bench/serve_load.py --url http://127.0.0.1:8000      # a running server (127.0.0.1 only)
    python bench/serve_load.py --concurrency 1 4 16 32 --requests 64

Without --url it starts a local Ray and the Serve app on a free port with a freshly initialised
depth-4 GPT (vocab 65,536; its zero lm_head makes every token equally likely, so answers run to
max_tokens) and a tokenizer from the artifact root, or one trained on shard 0 of the data mirror.
Reference (SPEC §14): 16 clients, one worker, depth 4: ~84 tok/s, 1.3 req/s, median latency ~7 s.
"""

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve package at the checkout root

from nanochat_ray.checkpoint import checkpoint_dir, save_checkpoint
from nanochat_ray.common import base_dir
from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.tokenizer import Tokenizer

PROMPT = "Tell me a story about a fox, a dog and a river, with a happy ending and a moral for children."


@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # seconds to the first piece of text
    latency: float = 0.0  # seconds to the end of the stream
    tokens: int = 0  # completion tokens (the server's usage count)


async def one_request(session: aiohttp.ClientSession, url: str, seed: int, max_tokens: int) -> Result:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 1.0,
            "seed": seed, "stream": True}
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                return Result(False)
            async for line in response.content:
                data = line.decode().strip().removeprefix("data: ")
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except aiohttp.ClientError:
        return Result(False)
    latency = time.perf_counter() - start
    return Result(True, ttft if ttft is not None else latency, latency, tokens)


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    """`concurrency` clients, each sending its next request when the last one ends."""
    queue = list(range(requests))
    results: list[Result] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            results.append(await one_request(session, url, queue.pop(), max_tokens))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


# -----------------------------------------------------------------------------
# a local server to measure


def _tokenizer_dir(data_root: Path, scratch: Path) -> Path:
    existing = base_dir() / "tokenizer"
    if (existing / "tokenizer.json").exists():
        return existing
    import pyarrow.parquet as pq

    directory = scratch / "tokenizer"
    print(f"no tokenizer in {existing}: training one (vocab 65,536) on shard 0 of {data_root}", flush=True)
    texts = pq.read_table(data_root / "pretrain_text" / "shard_00000.parquet", columns=["text"]).column("text")
    Tokenizer.train_from_iterator(texts.to_pylist(), vocab_size=65536, max_chars=200_000_000).save(directory)
    return directory


def start_server(args: argparse.Namespace, root: Path) -> str:
    """The app on a local Ray, its model and tokenizer under `root`; returns the URL."""
    import ray
    from ray import serve

    from serve.app import AppArgs, build_app

    tokenizer_dir = _tokenizer_dir(Path(args.data_root), root)
    vocab = Tokenizer.from_directory(tokenizer_dir).vocab_size
    cfg = make_config("cpu", depth=args.depth, vocab_size=vocab)
    torch.manual_seed(0)
    model = build_gpt(cfg.gpt_config())  # initialised: zero lm_head, so uniform next tokens
    save_checkpoint(checkpoint_dir("sft", cfg.model_tag, root), 0, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(cfg.gpt_config())})
    print(f"depth {args.depth}, {model.num_params():,} params, vocab {vocab:,}; "
          f"one model replica with {args.replica_cpus} CPUs, max_batch {args.max_batch}", flush=True)
    ray.init(address="local", num_cpus=os.cpu_count() + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(model_tag=cfg.model_tag, root=str(root), tokenizer_dir=str(tokenizer_dir),
                                max_batch=args.max_batch, max_queue=256, num_cpus=args.replica_cpus)),
              name="nanochat", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def measure(url: str, args: argparse.Namespace) -> None:
    asyncio.run(run_level(url, 2, 4, 8))  # warm-up: first forward, connections
    print(f"\n{'C':>3} {'requests':>8} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'lat p50':>8} {'lat p99':>8} {'errors':>6} {'tok/s vs C=1':>13}")
    baseline = None
    for c in args.concurrency:
        results, seconds = asyncio.run(run_level(url, c, max(args.requests, 2 * c), args.max_tokens))
        good = [r for r in results if r.ok]
        tokens_per_s = sum(r.tokens for r in good) / seconds
        baseline = baseline or tokens_per_s
        ttft, latency = [r.ttft for r in good], [r.latency for r in good]
        print(f"{c:>3} {len(results):>8} {len(good) / seconds:>6.2f} {tokens_per_s:>7.0f} "
              f"{percentile(ttft, .5):>8.2f}s {percentile(ttft, .99):>8.2f}s {percentile(latency, .5):>7.2f}s "
              f"{percentile(latency, .99):>7.2f}s {len(results) - len(good):>6} {tokens_per_s / baseline:>12.1f}x",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server on 127.0.0.1 (default: start one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least 2 per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--replica-cpus", type=int, default=os.cpu_count(), help="torch threads of the model replica")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA", "../shared/data"))
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        parser.error("--url must point at 127.0.0.1: this load test is for your own machine")

    with tempfile.TemporaryDirectory(prefix="serve_load_") as scratch:
        url = args.url or start_server(args, Path(scratch))
        measure(url, args)
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
