"""
The memory and time plan of a run, before paying for GPUs (nanochat_ray/plan.py has the model).

    python jobs/plan.py --preset d20 --gpus 8 --gpu h100-80gb --hourly-price 24
    python jobs/plan.py --preset d26 --gpus 8 --gpu a100-40gb --device-batch-size 8
    python jobs/plan.py --preset d32 --gpus 8 --gpu h100-80gb --as-reference   # the reference's own step

Prints every stage's per-rank peak memory (parameters, gradients, optimizer state, activations, the
largest transient, KV cache), FLOPs per token and expected time at the stated MFU, and the whole
run's time and cost. Exits with status 1 when a stage does not fit, naming the device batch that would.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.config import ConfigError, add_config_args, config_from_args
from nanochat_ray.gpus import GPU_KINDS, gpu_kind
from nanochat_ray.plan import format_plan, make_plan, refusal, savings


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", choices=list(GPU_KINDS), default="h100-80gb", help="GPU kind (default h100-80gb)")
    parser.add_argument("--mfu", type=float, default=0.45,
                        help="model FLOPs utilisation the times assume (default 0.45; the reference's d20 run "
                             "measured ~46%% on H100s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (training workers)")
    parser.add_argument("--hourly-price", type=float, default=None, help="price of the node per hour, for the cost")
    parser.add_argument("--as-reference", action="store_true",
                        help="model the reference's own step (bf16 embedding, its optimizer sharding, full logits)")
    add_plan_args(parser)
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "d20"  # a plan is for a GPU run, whatever this machine has
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        parser.error("--gpus must be ≥ 1 and --mfu in (0, 1]")
    plan = make_plan(cfg, gpu_kind(args.gpu), args.gpus, args.as_reference, args.mfu, args.hourly_price)
    print(format_plan(plan))
    if not args.as_reference:
        print("\nwhat our step saves against the reference's:\n" + savings(cfg, plan.gpu, args.gpus))
    problem = refusal(plan)
    if problem:
        print(f"\n{problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
