"""
Midtraining job (SPEC §7): teaches the base model the conversation format, tool use and multiple
choice, on a packed mixture of SmolTalk, MMLU, GSM8K with calculator calls, identity and
spelling tasks. Starts from the latest `base` checkpoint of the same model; saves `mid`.

    python jobs/midtrain.py --preset cpu
    ray job submit --working-dir . -- python jobs/midtrain.py --preset d20 --num-workers 8 --use-gpu
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.train import finetune


def main(argv: list[str] | None = None) -> dict:
    return finetune.main("mid", __doc__, argv)


if __name__ == "__main__":
    main()
