"""
Training-step throughput: forward + backward + optimizer step, tokens/s and MFU, for each of
eager / compiled × fp32 / bf16 autocast, interleaved so that load from other processes falls on
every configuration alike.

    python bench/train_step.py                       # depth 4, 1 × 1,024, all four configurations
    python bench/train_step.py --configs eager:bfloat16 compiled:bfloat16 --rounds 5

Prints the CPU model and its bf16 features first: the reference's compiled d4 step (nanochat at
01f5f10, fp32, same model and batch) ran ~720 tok/s on a 2-core AMD EPYC (AVX-512 BF16, no AMX)
and ~825 tok/s on a 2-core Intel Xeon with AMX; the goal is 1.3× that on a CPU without native
bf16 and 2× on one with it (issue 19). The last line places the best configuration against the
reference figure of this CPU's class. MFU is against a matmul peak measured here in each dtype.
"""

import argparse
import os
import statistics
import time

# as the training workers run (common.TRAINING_ENV: huge pages for big CPU tensors); torch reads it
# at its first allocation, so before the import. THP_MEM_ALLOC_ENABLE=0 in the shell measures without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch

from nanochat_ray.common import autocast, cpu_description, default_device, matmul_peak, native_bf16
from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt
from nanochat_ray.optim import build_optimizers

REFERENCE_COMPILED = {"amx": 825, "avx512_bf16": 720}  # tok/s, the reference's compiled d4 step by CPU class
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--configs", nargs="+", default=["eager:float32", "compiled:float32", "eager:bfloat16",
                                                         "compiled:bfloat16"], help="MODE:DTYPE, MODE eager or compiled")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each times every configuration once")
    parser.add_argument("--steps", type=int, default=4, help="steps per configuration per round (after 3 warm-up)")
    args = parser.parse_args()

    device = default_device()
    features = native_bf16()
    print(f"cpu: {cpu_description()}; native bf16: {', '.join(features) or 'none'}; "
          f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; device {device}; "
          f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}")
    tokens = args.batch * args.seq_len
    cfg = make_config("cpu", depth=args.depth, seq_len=args.seq_len, vocab_size=args.vocab_size,
                      device_batch_size=args.batch, total_batch_size=tokens, eval_tokens=tokens)
    x = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)

    steps = {}
    for name in args.configs:
        mode, dtype_name = name.split(":")
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        model = build_gpt(cfg.gpt_config(), device)
        optimizers = build_optimizers(model)
        step_model = torch.compile(model, dynamic=False) if mode == "compiled" else model

        def step(model=model, step_model=step_model, optimizers=optimizers, dtype=dtype) -> None:
            with autocast(device, dtype):
                loss = step_model(x, targets=y)
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(3):
            step()
        print(f"{name:>18}: warm-up (3 steps, compile included) {time.perf_counter() - start:.1f} s", flush=True)
        steps[name] = step
    flops_per_token = model.estimate_flops()

    rates: dict[str, list[float]] = {name: [] for name in steps}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in steps}  # this process's, all threads
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(tokens * args.steps / (time.perf_counter() - start))
            cpu_seconds[name].append((time.process_time() - cpu_start) / args.steps)

    peaks = {d: matmul_peak(device, DTYPES[d]) for d in {n.split(":")[1] for n in steps}}
    print(f"\nmodel depth {args.depth}: {model.num_params():,} params, {flops_per_token / 1e6:.1f} MFLOP/token, "
          f"batch {args.batch} × {args.seq_len}; median of {args.rounds} rounds × {args.steps} steps")
    # on a loaded machine wall time is set by the others; CPU seconds per step still compare configurations
    print(f"{'configuration':>18} {'tok/s':>7} {'ms/step':>8} {'CPU s/step':>10} {'GFLOP/s':>8} {'MFU':>6}  (vs measured matmul peak)")
    for name, values in rates.items():
        rate = statistics.median(values)
        achieved = rate * flops_per_token
        peak = peaks[name.split(":")[1]]
        print(f"{name:>18} {rate:>7,.0f} {tokens / rate * 1000:>8.0f} {statistics.median(cpu_seconds[name]):>10.2f} "
              f"{achieved / 1e9:>8.1f} {100 * achieved / peak:>5.1f}%")
    print("matmul peak: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    reference_shape = (args.depth, args.seq_len, args.batch, args.vocab_size) == (4, 1024, 1, 65536)
    if device.type == "cpu" and reference_shape:  # the reference's figures are for this shape only
        best = max(rates, key=lambda n: statistics.median(rates[n]))
        cls = "amx" if "amx_bf16" in features else "avx512_bf16"
        reference, goal = REFERENCE_COMPILED[cls], 2.0 if features else 1.3
        print(f"best {best}: {statistics.median(rates[best]):,.0f} tok/s = "
              f"{statistics.median(rates[best]) / reference:.2f}× the reference's compiled step on a "
              f"{'Xeon with AMX' if cls == 'amx' else 'EPYC without AMX'} (~{reference} tok/s; goal {goal}×)")


if __name__ == "__main__":
    main()
