"""
Load test of the chat server against its own engine: C concurrent streaming clients on
127.0.0.1, R requests per level, max_tokens 64; req/s, generated tok/s, time to first token and
latency (p50/p95), errors; next to it the engine's batched tok/s at min(C, max_batch) rows (same
model, prompt and token count, measured in this process right before the level) and the ratio
served/engine (target at 16 clients: >= 80%, SPEC §14), CPU per token of server and engine, and
the CPU seconds each process of the server spent during the level (where the time goes).

    python bench/serve_load.py                                  # own server: depth-4 model, random weights (~3 min)
    python bench/serve_load.py --concurrency 1 4 16 32 --requests 64
    python bench/serve_load.py --url http://127.0.0.1:8000      # a running server (127.0.0.1 only; no engine figure)

Without --url it starts a local Ray and the Serve app on a free port with a freshly initialised
depth-4 GPT (vocab 65,536; its zero lm_head makes every token equally likely, so answers run to
max_tokens) and a tokenizer from the artifact root, or one trained on shard 0 of the data mirror.
Reference (SPEC §14): 16 clients, one worker, depth 4: ~84 tok/s, 1.3 req/s, median latency ~7 s
(~227 tok/s, median 0.9 s, p95 13.8 s on a machine with AMX).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve package at the checkout root

from nanochat_ray.checkpoint import checkpoint_dir, save_checkpoint
from nanochat_ray.common import base_dir, cpu_description
from nanochat_ray.config import make_config
from nanochat_ray.engine import DecodeBatch
from nanochat_ray.gpt import GPT, build_gpt
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


def engine_tokens_per_second(model: GPT, tokenizer: Tokenizer, rows: int, max_tokens: int, repeats: int = 3) -> float:
    """The engine alone: PROMPT prefilled once into `rows` rows, each decoded to max_tokens;
    generated tokens (all rows) per second, median of `repeats` (in this process, same threads
    as the model replica)."""
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": PROMPT},
                                                           {"role": "assistant", "content": ""}]})
    rates = []
    for seed in range(repeats):
        batch = DecodeBatch(model, tokenizer, max_rows=rows, seq_len=len(prompt) + max_tokens + 1)
        start, generated = time.perf_counter(), 0
        batch.add(prompt, num_samples=rows, max_tokens=max_tokens, seed=seed)
        while len(batch):
            generated += len(batch.step())
        rates.append(generated / (time.perf_counter() - start))
    return statistics.median(rates)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        found.extend(kids := children.get(todo.pop(), []))
        todo.extend(kids)
    return found


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds so far of this process and the Ray processes it started, by role (Ray's
    process titles: ServeReplica:<app>:<deployment>, ProxyActor, ...; Linux only)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            role = ("load client + engine (this process)" if pid == os.getpid()
                    else title.removeprefix("ray::").split()[0].split("/")[-1] or "?")
            totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


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


def start_server(args: argparse.Namespace, root: Path) -> tuple[dict[str, str], GPT, Tokenizer]:
    """The app on a local Ray, once per --stream-interval (side by side, one model replica each),
    its model and tokenizer under `root`; returns {label: URL}, the model and the tokenizer (for
    the engine's figure)."""
    import ray
    from ray import serve

    from serve.app import AppArgs, build_app

    tokenizer_dir = _tokenizer_dir(Path(args.data_root), root)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    vocab = tokenizer.vocab_size
    cfg = make_config("cpu", depth=args.depth, vocab_size=vocab)
    torch.manual_seed(0)
    model = build_gpt(cfg.gpt_config())  # initialised: zero lm_head, so uniform next tokens
    save_checkpoint(checkpoint_dir("sft", cfg.model_tag, root), 0, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(cfg.gpt_config())})
    print(f"depth {args.depth}, {model.num_params():,} params, vocab {vocab:,}; "
          f"one model replica with {args.replica_cpus} CPUs, max_batch {args.max_batch}", flush=True)
    apps = len(args.stream_interval)
    ray.init(address="local", num_cpus=apps * (args.replica_cpus + 1) + 2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for k, interval in enumerate(args.stream_interval):
        serve.run(build_app(AppArgs(model_tag=cfg.model_tag, root=str(root), tokenizer_dir=str(tokenizer_dir),
                                    max_batch=args.max_batch, max_queue=256, num_cpus=args.replica_cpus,
                                    stream_interval_s=interval)),
                  name=f"nanochat{k}", route_prefix=f"/app{k}")
        urls[f"ticks {interval:g} s"] = f"http://127.0.0.1:{port}/app{k}"
    return urls, model.eval(), tokenizer


def measure(urls: dict[str, str], args: argparse.Namespace, model: GPT | None, tokenizer: Tokenizer | None) -> None:
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {args.replica_cpus} threads in the engine and each "
          f"replica; {args.max_tokens} tokens per answer", flush=True)
    for url in urls.values():
        asyncio.run(run_level(url, 2, 4, 8))  # warm-up: first forward, connections
    print(f"\n{'server':>14} {'C':>3} {'requests':>8} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'lat p50':>8} {'lat p95':>8} {'errors':>6} {'CPU ms/tok':>11} {'engine tok/s':>13} {'CPU ms/tok':>11} "
          f"{'served/engine':>14} {'by CPU':>7}")
    cpu_report = []
    for _ in range(args.rounds):  # servers alternate within a round: the machine's load hits both alike
        for c in args.concurrency:
            engine, engine_cpu = None, None
            if model is not None:
                torch.set_num_threads(args.replica_cpus)
                cpu = time.process_time()
                engine = engine_tokens_per_second(model, tokenizer, min(c, args.max_batch), args.max_tokens)
                engine_cpu = (time.process_time() - cpu) / (3 * min(c, args.max_batch) * args.max_tokens)
            for label, url in urls.items():
                cpu_before = cpu_seconds_by_process()
                results, seconds = asyncio.run(run_level(url, c, max(args.requests, 2 * c), args.max_tokens))
                cpu_after = cpu_seconds_by_process()
                good = [r for r in results if r.ok]
                tokens = sum(r.tokens for r in good)
                tokens_per_s = tokens / seconds
                ttft, latency = [r.ttft for r in good], [r.latency for r in good]
                spent = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
                # the control plane's CPU does not scale with tokens (and grows with the apps deployed)
                server_cpu = sum(t for role, t in spent.items()
                                 if not role.startswith(("load client", "ServeController")))
                server_cpu = server_cpu / max(tokens, 1)
                engine_text = (f"{engine:>13.0f} {engine_cpu * 1000:>11.2f} {tokens_per_s / engine:>13.0%} "
                               f"{engine_cpu / server_cpu:>7.0%}" if engine else f"{'-':>13} {'-':>11} {'-':>14}")
                print(f"{label:>14} {c:>3} {len(results):>8} {len(good) / seconds:>6.2f} {tokens_per_s:>7.0f} "
                      f"{percentile(ttft, .5):>8.2f}s {percentile(ttft, .95):>8.2f}s "
                      f"{percentile(latency, .5):>7.2f}s {percentile(latency, .95):>7.2f}s "
                      f"{len(results) - len(good):>6} {server_cpu * 1000:>11.2f} {engine_text}",
                      flush=True)
                busy = sorted(((t, role) for role, t in spent.items() if t >= 0.05 * seconds), reverse=True)
                cpu_report.append(f"{label}, C={c} ({seconds:.1f} s): "
                                  + ", ".join(f"{role} {t:.1f}" for t, role in busy))
    print("\nCPU ms/tok: CPU time of the server's processes (this Ray's replicas, proxy, raylet...; not the Serve "
          "controller) per generated token, and the engine's alone. CPU seconds during each level, by process "
          "(those above 5% of the level's wall time). served/engine compares tok/s; by CPU compares CPU per "
          "token (engine's / server's), what served/engine tends to when the server has the cores to itself; on "
          "a loaded machine the server's several processes take a bigger share of the contended cores than the "
          "engine's one, and served/engine reads high:")
    print("\n".join(cpu_report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server on 127.0.0.1 (default: start one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16, help="rows per decode step in the replica")
    parser.add_argument("--replica-cpus", type=int, default=os.cpu_count(), help="torch threads of the model replica")
    parser.add_argument("--stream-interval", type=float, nargs="+", default=[0.05],
                        help="the app's stream_interval_s; several: one app each, measured in alternation")
    parser.add_argument("--rounds", type=int, default=1, help="times to run every level (servers alternate)")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA", "../shared/data"))
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        parser.error("--url must point at 127.0.0.1: this load test is for your own machine")

    with tempfile.TemporaryDirectory(prefix="serve_load_") as scratch:
        if args.url:
            urls, model, tokenizer = {"--url": args.url.rstrip("/")}, None, None
        else:
            urls, model, tokenizer = start_server(args, Path(scratch))
        measure(urls, args, model, tokenizer)
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
