"""
Supervised finetuning job (SPEC §9): one conversation per row (padded, loss only on the
assistant's tokens) from ARC, GSM8K, SmolTalk, identity and spelling tasks, at 2% of the base
LRs decaying linearly to 0. Starts from the latest `mid` checkpoint; saves `sft`.

    python jobs/sft.py --preset cpu
    ray job submit --working-dir . -- python jobs/sft.py --preset d20 --num-workers 8 --use-gpu
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.train import finetune


def main(argv: list[str] | None = None) -> dict:
    return finetune.main("sft", __doc__, argv)


if __name__ == "__main__":
    main()
