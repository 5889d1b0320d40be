"""
A rehearsal at real size on CPU: the d20 model (561M parameters), two full training steps at batch
1 × 2,048 (forward, backward, Muon + AdamW, through train/loop.py), one eval batch (val bpb) and
16 engine decode steps, each with its time, its peak memory and the plan's prediction beside it.

    python bench/rehearsal.py                      # ~12 GiB of RAM; run it alone
    python bench/rehearsal.py --depth 4            # the same on a small model, in seconds

Peak memory is the process's peak RSS during the phase (reset before each through
/proc/self/clear_refs, Linux) above its RSS before the model was built; the script re-executes
itself with MALLOC_MMAP_THRESHOLD_ set so freed tensors leave the RSS. CPU, fp32, eager: the
plan's eager-fp32 figures. The engine's tokenizer is a small one trained here (the weights are
untrained, so only the token ids matter).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MMAP_THRESHOLD = "65536"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--decode-steps", type=int, default=16)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})

    import numpy as np
    import torch

    from nanochat_ray.common import peak_flops
    from nanochat_ray.config import make_config
    from nanochat_ray.engine import Engine
    from nanochat_ray.evals.bpb import evaluate_bpb
    from nanochat_ray.gpt import build_gpt
    from nanochat_ray.optim import build_optimizers
    from nanochat_ray.plan import (GiB, _status_kib, decode_memory, eval_memory, num_params, optimizer_bytes,
                                   param_bytes, recipe, train_memory)
    from nanochat_ray.tokenizer import Tokenizer
    from nanochat_ray.data.rows import to_batch
    from nanochat_ray.train.loop import TrainState, run

    cfg = make_config("d20", depth=args.depth, device_batch_size=1, total_batch_size=2048, eval_tokens=2048)
    r = recipe()
    rng = np.random.default_rng(0)

    def rss() -> int:
        return _status_kib("VmRSS") * 1024

    def reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    tokenizer = Tokenizer.train_from_iterator(iter(["a rehearsal of the engine " * 20] * 50), vocab_size=270)
    cpu_peak = peak_flops(torch.device("cpu"), torch.float32)  # for the loop's MFU; measured before the baseline
    base = rss()
    rows_out = []

    def phase(name: str, work, predicted: float) -> None:
        reset_peak()
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM") * 1024 - base
        rows_out.append((name, seconds, peak, predicted))
        print(f"{name:<28} {seconds:8.1f}s  peak {peak / GiB:6.2f} GiB  plan {predicted / GiB:6.2f} GiB", flush=True)

    print(f"d{cfg.depth}: {num_params(cfg):,} parameters, batch 1 × {cfg.seq_len}, "
          f"{torch.get_num_threads()} threads, fp32 eager", flush=True)
    holder = {}

    def build() -> None:
        torch.manual_seed(0)
        holder["model"] = build_gpt(cfg.gpt_config(), "cpu")
        holder["optimizers"] = build_optimizers(holder["model"], cfg.embedding_lr, cfg.unembedding_lr,
                                                cfg.matrix_lr, cfg.weight_decay)
    phase("build model + optimizers", build, param_bytes(cfg, r))
    model, optimizers = holder["model"], holder["optimizers"]
    assert model.num_params() == num_params(cfg), "the plan's parameter count must match the model's"
    rows = rng.integers(0, cfg.vocab_size, (1, cfg.seq_len + 1))
    state = TrainState()
    static = param_bytes(cfg, r) + optimizer_bytes(cfg, r, 1)[0]
    train = train_memory(cfg, r, 1, cfg.seq_len, "eager-fp32", 1)
    for step in (1, 2):
        # step 1 also creates the optimizer state; both are predicted with it present
        phase(f"training step {step}", lambda step=step: run(cfg, model, optimizers, lambda s: (lambda: (rows, {})),
                                                             lambda *a: None, state, step, cpu_peak), train.total)
    batch = [to_batch(rng.integers(0, cfg.vocab_size, (1, cfg.seq_len + 1)), torch.device("cpu"))]
    token_bytes = torch.ones(cfg.vocab_size, dtype=torch.int64)
    model.eval()
    phase("eval batch (val bpb)", lambda: evaluate_bpb(model, batch, token_bytes),
          eval_memory(cfg, r, 1, cfg.seq_len, with_optimizer_of=1, nbytes=4).total)
    prompt = rng.integers(0, 256, 32).tolist()
    engine = Engine(model, tokenizer)

    def decode() -> None:
        with torch.no_grad():
            for _ in zip(range(args.decode_steps), engine.generate(prompt, max_tokens=args.decode_steps,
                                                                   temperature=0.0)):
                pass
    phase(f"{args.decode_steps} engine decode steps", decode,
          static + decode_memory(cfg, r, 1, len(prompt) + args.decode_steps, nbytes=4).total - param_bytes(cfg, r))
    print("\n| phase | time | peak RSS above start | plan | plan / measured |\n|---|---|---|---|---|")
    for name, seconds, peak, predicted in rows_out:
        print(f"| {name} | {seconds:.1f} s | {peak / GiB:.2f} GiB | {predicted / GiB:.2f} GiB | {predicted / peak:.2f} |")


if __name__ == "__main__":
    main()
