"""Tokenizer benchmark against SPEC §14: training time and compression (UTF-8 bytes per token).

Trains the 65,536-token vocabulary on every pretrain_text shard but the last (docs cut to
10,000 chars) two ways, alternating, on the same texts in memory: ours (`Tokenizer.train_from_iterator`,
down to the `tokenizers` encoder) and the reference's (rustbpe with the reference's split pattern,
down to its token → rank table; the reference then builds a tiktoken encoder, timed apart when
tiktoken is installed).
Prints the CPU, each run's wall and CPU seconds, the medians and their ratio; then bytes/token on
the last (validation) shard for both, and ours on a training slice and a few fixed sample texts.
GPT-2 / GPT-4 columns appear only when tiktoken is installed and has its encodings cached; it is
not a dependency.

    python bench/tokenizer.py [--data-root ../shared/data] [--repeats 5] [--copies 1]
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import rustbpe

from nanochat_ray.report import hardware
from nanochat_ray.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

SPEC_SECONDS, SPEC_BYTES_PER_TOKEN = 1.6, 4.68  # the reference's figures, SPEC §14

# fixed samples of several kinds, written for this benchmark
SAMPLES = {
    "prose": (
        "The council met on Tuesday evening to discuss the new bridge. Residents who live near the "
        "river said the old crossing floods every spring, and farmers complained that the detour adds "
        "forty minutes to each trip to the market. The mayor promised a decision before the end of the year."
    ),
    "code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
    "math": (
        r"For $x \in \mathbb{R}$ the Gaussian integral gives $\int_{-\infty}^{\infty} e^{-x^2}\,dx = \sqrt{\pi}$, "
        r"hence $\frac{1}{\sigma\sqrt{2\pi}} \int e^{-(x-\mu)^2 / 2\sigma^2} dx = 1$ and "
        r"$\mathbb{E}[X^2] = \mu^2 + \sigma^2$ for $X \sim \mathcal{N}(\mu, \sigma^2)$."
    ),
    "science": (
        "Photosynthesis converts carbon dioxide and water into glucose and oxygen using light energy. "
        "In the light-dependent reactions, chlorophyll absorbs photons at 430 nm and 662 nm, splitting "
        "water and producing ATP and NADPH, which the Calvin cycle then uses to fix CO2."
    ),
    "korean": (
        "서울은 대한민국의 수도이며 한강을 끼고 있는 대도시이다. 조선 시대부터 정치와 문화의 중심지였고, "
        "오늘날에는 약 천만 명의 시민이 살고 있다. 봄에는 벚꽃이 피고 가을에는 단풍이 아름답다."
    ),
}


def bytes_per_token(texts: list[str], encode) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in encode(texts))
    return n_bytes / n_tokens


def reference_encoders() -> dict:
    """GPT-2 and GPT-4 tokenizers via tiktoken, where installed and cached (no downloads needed)."""
    try:
        import tiktoken
    except ImportError:
        return {}
    encoders = {}
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            enc = tiktoken.get_encoding(name)
        except Exception:  # not cached and offline: skip this column
            continue
        encoders[label] = lambda texts, enc=enc: enc.encode_ordinary_batch(texts)
    return encoders


def reference_training(texts: list[str], vocab_size: int, doc_cap: int) -> rustbpe.Tokenizer:
    """What the reference's tok_train.py times, minus the tiktoken encoder: rustbpe on the capped docs."""
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator((t[:doc_cap] for t in texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    {bytes(b): rank for b, rank in trainer.get_mergeable_ranks()}  # the reference's ranks table
    return trainer


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """fn's result, wall seconds and CPU seconds of this process (all threads)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    # the datasets sit beside the repository (../shared/data); NANOCHAT_DATA moves them
    repo_root = Path(__file__).resolve().parents[1]
    default_root = Path(os.environ.get("NANOCHAT_DATA", repo_root.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=default_root)
    parser.add_argument("--vocab-size", type=int, default=65_536)
    parser.add_argument("--doc-cap", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="training runs of each; medians are reported")
    parser.add_argument("--copies", type=int, default=1,
                        help="train on the shards' text this many times over: a larger run's share of text "
                             "splitting (grows with the text) against the merge loop (grows with distinct chunks)")
    args = parser.parse_args()

    shards = sorted((args.data_root / "pretrain_text").glob("shard_*.parquet"))
    if len(shards) < 2:
        raise SystemExit(f"need at least 2 shards under {args.data_root / 'pretrain_text'}, found {len(shards)}")
    train_texts = [t for s in shards[:-1] for t in pq.read_table(s, columns=["text"]).column("text").to_pylist()]
    val_texts = pq.read_table(shards[-1], columns=["text"]).column("text").to_pylist()
    train_texts *= args.copies
    print(f"train: {len(shards) - 1} shards" + (f" × {args.copies}" if args.copies > 1 else "") +
          f", {len(train_texts):,} docs, {sum(map(len, train_texts)):,} chars")
    print(f"val:   {shards[-1].name}, {len(val_texts):,} docs, {sum(map(len, val_texts)):,} chars")

    print(f"machine: {hardware()}; load average {os.getloadavg()[0]:.1f} (a loaded machine blurs wall times: "
          "compare the ratio, and CPU seconds)")
    runs = {"ours": [], "rustbpe": []}
    for i in range(args.repeats):
        order = ["ours", "rustbpe"] if i % 2 == 0 else ["rustbpe", "ours"]  # alternate, so drift hits both
        for name in order:
            if name == "ours":
                tok, wall, cpu = timed(lambda: Tokenizer.train_from_iterator(train_texts, args.vocab_size,
                                                                             doc_cap=args.doc_cap))
            else:
                ref, wall, cpu = timed(lambda: reference_training(train_texts, args.vocab_size, args.doc_cap))
            runs[name].append((wall, cpu))
            print(f"  run {i + 1} {name:<8} {wall:6.2f} s wall {cpu:6.2f} s CPU", flush=True)
    medians = {name: [statistics.median(r[k] for r in rows) for k in (0, 1)] for name, rows in runs.items()}
    print(f"\ntraining, vocab {tok.vocab_size:,}, median of {args.repeats} runs (SPEC §14 reference ~{SPEC_SECONDS} s):")
    print(f"  {'':<8} {'wall':>8} {'CPU':>8}")
    for name, (wall, cpu) in medians.items():
        print(f"  {name:<8} {wall:7.2f}s {cpu:7.2f}s")
    (ours_wall, ours_cpu), (ref_wall, ref_cpu) = medians["ours"], medians["rustbpe"]
    print(f"  rustbpe / ours: {ref_wall / ours_wall:.2f}x wall, {ref_cpu / ours_cpu:.2f}x CPU (above 1: ours is faster)")
    try:  # the reference's train_from_iterator also builds its tiktoken encoder from the ranks
        import tiktoken
        ranks = {bytes(b): rank for b, rank in ref.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        builds = [timed(lambda: tiktoken.Encoding("ref", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                                  special_tokens=specials))[1] for _ in range(3)]
        print(f"  the reference then builds a tiktoken encoder: +{statistics.median(builds):.2f} s wall "
              "(not in its column above)")
    except ImportError:
        print("  (tiktoken is not installed: the reference's tiktoken encoder build, which follows its "
              "training, is not timed)")

    t0 = time.perf_counter()
    val_ratio = bytes_per_token(val_texts, tok.encode)
    encode_s = time.perf_counter() - t0
    ref_ratio = bytes_per_token(val_texts, ref.batch_encode)
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    print(f"compression on {shards[-1].name}: ours {val_ratio:.3f} bytes/token, rustbpe's own encoder "
          f"{ref_ratio:.3f} (SPEC §14 reference {SPEC_BYTES_PER_TOKEN}); ours encoded {val_bytes / encode_s / 1e6:.1f} MB/s")

    # compression table: our tokenizer, and the references where available
    others = reference_encoders()
    rows = {"train slice": train_texts[:500], "val shard": val_texts} | {k: [v] for k, v in SAMPLES.items()}
    header = f"{'text':<12} {'bytes':>10} {'ours':>7}" + "".join(f" {label:>7}" for label in others)
    print("\nbytes/token\n" + header + "\n" + "-" * len(header))
    for name, texts in rows.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        cells = [bytes_per_token(texts, tok.encode)] + [bytes_per_token(texts, enc) for enc in others.values()]
        print(f"{name:<12} {n_bytes:>10,}" + "".join(f" {c:>7.2f}" for c in cells))
    if not others:
        print("(GPT-2 / GPT-4 columns skipped: tiktoken is not installed, or its encodings are not cached)")


if __name__ == "__main__":
    main()
