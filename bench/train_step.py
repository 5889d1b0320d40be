"""
Training-step throughput: forward + backward + optimizer step, tokens/s and MFU.

    python bench/train_step.py --depth 4 --seq-len 1024 --batch 1 [--compile]

MFU is reported against a matmul peak measured on this machine in the same dtype (and,
on CUDA in bf16, also against the GPU kind's dense bf16 peak from nanochat_ray/gpus.py), so CPU figures are comparable with
SPEC §14 (reference: ~510 tok/s eager, ~720 tok/s compiled on 2 AVX-512 cores).
"""

import argparse
import time

import torch

from nanochat_ray.common import autocast, compute_dtype, default_device, matmul_peak, peak_flops
from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.optim import build_optimizers

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()

    device = default_device()
    dtype = compute_dtype("auto", device)
    torch.manual_seed(0)
    tokens = args.batch * args.seq_len
    cfg = make_config("cpu", depth=args.depth, seq_len=args.seq_len, vocab_size=args.vocab_size,
                      device_batch_size=args.batch, total_batch_size=tokens, eval_tokens=tokens)
    model = build_gpt(cfg.gpt_config(), device)
    optimizers = build_optimizers(model)
    flops_per_token = model.estimate_flops()
    step_model = torch.compile(model, dynamic=False) if args.compile else model

    x = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)

    def step() -> None:
        with autocast(device, dtype):
            loss = step_model(x, targets=y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    tokens_per_second = args.batch * args.seq_len * args.steps / elapsed
    achieved = tokens_per_second * flops_per_token
    peak = matmul_peak(device, dtype)
    print(f"device {device} ({torch.get_num_threads()} threads), dtype {dtype}, compile {args.compile}")
    print(f"model depth {args.depth}: {model.num_params():,} params, {flops_per_token / 1e6:.1f} MFLOP/token")
    print(f"step time        {elapsed / args.steps * 1000:.1f} ms")
    print(f"tokens/s         {tokens_per_second:,.0f}")
    print(f"achieved         {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul peak      {peak / 1e9:.1f} GFLOP/s (measured, {dtype})")
    print(f"MFU vs measured  {100 * achieved / peak:.1f}%")
    if device.type == "cuda" and dtype == torch.bfloat16:
        print(f"MFU vs this GPU's bf16 peak {100 * achieved / peak_flops(device, dtype):.1f}% (nanochat_ray/gpus.py)")


if __name__ == "__main__":
    main()
