"""
Reinforcement learning job (SPEC §10): GSM8K train questions, num-samples completions each from
rollout actors (temperature 1, top-k 50, calculator on), reward 1 for the right final number,
advantage = reward − the question's mean, REINFORCE on the sampled tokens, LR from 5% of the
base LRs decaying linearly to 0; pass@k on held-out test questions every --eval-every steps and
a checkpoint every --save-every. Starts from the latest `sft` checkpoint; saves `rl`.

    python jobs/rl.py --preset cpu
    python jobs/rl.py --preset smoke --task toy                     # plumbing check: reward must rise
    ray job submit --working-dir . -- python jobs/rl.py --preset d20 --use-gpu --num-rollout-actors 7
"""

import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.config import RL_OPTIONS, config_from_args, default_preset
from nanochat_ray.rl.driver import RLOptions, rl_train
from nanochat_ray.train.cli import done_line, run_options, training_parser

FLAGS = {  # RLOptions field → help
    "task": "gsm8k, or toy: 'answer with the number 7', a plumbing check whose reward must rise",
    "questions_per_step": "questions per step (SPEC: 16)",
    "samples_per_question": "completions per question (SPEC: 16)",
    "max_new_tokens": "most tokens per completion (SPEC: 256)",
    "temperature": "sampling temperature (SPEC: 1.0)",
    "top_k": "top-k sampling (SPEC: 50)",
    "eval_questions": "held-out test questions for pass@k (SPEC: 400)",
    "eval_samples": "samples per eval question: pass@1..k (SPEC: 8)",
    "num_rollout_actors": "rollout actors, each with a model copy and the engine (one per GPU)",
    "questions_per_call": "questions per rollout call (0 = half an actor's share, so results stream to the learner)",
    "placement": "separate: learner and each rollout actor a GPU of their own; colocated: half a GPU each",
    "cpus_per_actor": "CPUs reserved by each rollout actor",
    "call_timeout_s": "the longest one actor call may take before the attempt counts as failed (a hung actor)",
}


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__)
    group = parser.add_argument_group("RL (defaults from the preset: smoke and cpu sample less)")
    for f in fields(RLOptions):
        group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=FLAGS[f.name],
                           metavar=type(f.default).__name__.upper())
    args = parser.parse_args(argv)
    if args.num_workers != 1:
        parser.error("the RL learner is one actor: use --num-rollout-actors to add rollout actors")
    preset = args.preset = args.preset or default_preset()  # decided (and said) once
    options = RLOptions(**{**RL_OPTIONS.get(preset, {}),
                           **{f.name: getattr(args, f.name) for f in fields(RLOptions) if getattr(args, f.name) is not None}})
    cfg = config_from_args(args, "rl")
    result = rl_train(cfg, options, run_options(args))
    print(done_line(result))
    return result


if __name__ == "__main__":
    main()
