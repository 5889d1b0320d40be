"""
Stage 1 of the speedrun (SPEC §1-§2): start the pretraining shard downloads in the background,
train the BPE tokenizer on the first characters of the train shards while they download,
save it, print its compression, then wait for the rest of the shards.

    python jobs/tokenizer.py --preset smoke --data-root ../shared/data
    ray job submit --working-dir . -- python jobs/tokenizer.py --preset d20

Writes tokenizer.json and token_bytes.pt to --output (default base_dir()/tokenizer); shards land
in base_dir()/data/pretrain, or a mirror's are used in place. main() returns the results as a dict.
"""

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from nanochat_ray.common import add_verbose_flag, base_dir, default_tokenizer_dir, init_ray
from nanochat_ray.config import Config, ConfigError, add_config_args, config_from_args
from nanochat_ray.data.download import ShardDownloads, shards_needed, start_downloads, train_and_val_shards
from nanochat_ray.data.registry import NUM_SHARDS
from nanochat_ray.tokenizer import Tokenizer

# fixed texts of several kinds for the compression table, written for this job
SAMPLES = {
    "news": (
        "City officials confirmed on Monday that the old harbour bridge will close for repairs in March. "
        "Commuters will be diverted to the ferry, which is adding two early sailings, and the council "
        "expects the work to last about eleven weeks if the weather holds."
    ),
    "korean": (
        "오늘 아침 시장에서 사과와 배를 샀다. 가격이 지난주보다 조금 올랐지만 맛은 아주 좋았다. "
        "저녁에는 가족과 함께 과일을 나누어 먹으며 주말 계획을 이야기했다."
    ),
    "code": (
        "def word_counts(lines):\n"
        "    counts = {}\n"
        "    for line in lines:\n"
        "        for word in line.lower().split():\n"
        "            counts[word] = counts.get(word, 0) + 1\n"
        "    return sorted(counts.items(), key=lambda kv: -kv[1])\n"
    ),
    "math": (
        r"Let $f(x) = \sum_{n=0}^{\infty} \frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$, "
        r"so $f(x) = e^x$. In particular $\int_0^1 f(x)\,dx = e - 1 \approx 1.718$."
    ),
    "science": (
        "Mitochondria produce most of a cell's ATP through oxidative phosphorylation. Electrons from NADH "
        "pass along the transport chain in the inner membrane, pumping protons that then flow back "
        "through ATP synthase at a rate of roughly 100 molecules per second."
    ),
}
SLICE_CHARS = 1_000_000  # characters of the train and val shards in the compression table


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description="Train the tokenizer while the pretraining shards download.")
    add_config_args(parser)
    parser.add_argument("--data-root", default=None,
                        help="local data mirror laid out like shared/data (default: $NANOCHAT_DATA, else download)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="pretraining shards to fetch, val included (default: what the config's tokenizer "
                             "and pretraining horizon need; d20: 239; a mirror caps it)")
    parser.add_argument("--output", type=Path, default=None, help="tokenizer directory (default: base_dir()/tokenizer)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    # every check happens here, before Ray starts or anything is downloaded
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    if args.num_shards is None:
        args.num_shards = shards_needed(cfg)
    if not 2 <= args.num_shards <= NUM_SHARDS:
        parser.error(f"--num-shards must lie in 2..{NUM_SHARDS} (at least one train shard and the val shard), "
                     f"got {args.num_shards}")
    args.output = args.output or default_tokenizer_dir()
    return args, cfg


# -----------------------------------------------------------------------------
# text


def shard_texts(path: Path) -> Iterator[str]:
    # one row group at a time: a hub shard holds ~250M characters
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
        yield from batch.column("text").to_pylist()


def training_text(downloads: ShardDownloads, paths: list[Path], doc_cap: int, bar: tqdm) -> Iterator[str]:
    """Documents of the train shards in order; waits for each shard only when the trainer reaches it."""
    for path in paths:
        downloads.wait([path])
        for text in shard_texts(path):
            bar.update(min(len(text), doc_cap, bar.total - bar.n))  # the trainer stops at the cap
            yield text


def text_slice(path: Path, chars: int) -> str:
    texts, total = [], 0
    for text in shard_texts(path):
        if total >= chars:
            break
        texts.append(text)
        total += len(text)
    return "\n".join(texts)[:chars]


def compression_table(tokenizer: Tokenizer, texts: dict[str, str]) -> dict[str, float]:
    """Print and return UTF-8 bytes per token for each text (higher: better compression)."""
    print(f"\ncompression, vocab {tokenizer.vocab_size:,} (UTF-8 bytes per token, higher is better)")
    print(f"  {'text':<10}{'bytes':>12}{'tokens':>12}{'bytes/token':>13}")
    ratios = {}
    for name, text in texts.items():
        n_bytes, n_tokens = len(text.encode("utf-8")), len(tokenizer.encode(text))
        ratios[name] = n_bytes / n_tokens
        print(f"  {name:<10}{n_bytes:>12,}{n_tokens:>12,}{ratios[name]:>13.2f}")
    return ratios


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    init_ray()
    # downloads first: they run in Ray tasks during the whole training below
    downloads = start_downloads(args.num_shards, args.data_root)
    train_paths, val_path = train_and_val_shards(downloads.paths)
    print(f"tokenizer: vocab {cfg.vocab_size:,}, first {cfg.tokenizer_max_chars:,} characters of "
          f"{len(train_paths)} train shard(s), documents cut to {cfg.tokenizer_doc_cap:,}", flush=True)

    # Trained here in the driver rather than in a Ray task: the Rust trainer uses every core of its
    # machine whatever a task would reserve, the shards are on this node's disk (the downloads are
    # pinned here), and the tokenizer is written to the artifact root straight away.
    start = time.perf_counter()
    with tqdm(total=cfg.tokenizer_max_chars, unit="char", unit_scale=True, desc="tokenizer text") as bar:
        texts = training_text(downloads, train_paths, cfg.tokenizer_doc_cap, bar)
        tokenizer = Tokenizer.train_from_iterator(texts, cfg.vocab_size, cfg.tokenizer_doc_cap,
                                                  cfg.tokenizer_max_chars)
        train_chars = bar.n
    train_seconds = time.perf_counter() - start
    tokenizer.save(args.output)
    print(f"trained on {train_chars:,} characters in {train_seconds:.1f}s "
          f"({train_chars / train_seconds / 1e6:.1f}M chars/s); saved to {args.output}", flush=True)
    if train_chars < cfg.tokenizer_max_chars:
        print(f"note: the train shards hold fewer than the {cfg.tokenizer_max_chars:,} characters asked for")

    downloads.wait([val_path])
    ratios = compression_table(tokenizer, {"train": text_slice(train_paths[0], SLICE_CHARS),
                                           "val": text_slice(val_path, SLICE_CHARS), **SAMPLES})

    downloads.wait()
    print(f"\ntokenizer: {args.output}\n"
          f"pretraining shards: {len(train_paths)} train + 1 val in {val_path.parent} (val: {val_path.name})",
          flush=True)
    return {
        "tokenizer_dir": str(args.output),
        "vocab_size": tokenizer.vocab_size,
        "train_chars": train_chars,
        "train_seconds": train_seconds,
        "compression": ratios,
        "train_shards": [str(p) for p in train_paths],
        "val_shard": str(val_path),
    }


if __name__ == "__main__":
    main()
