"""
Chat-model evaluation (SPEC §8): ARC-Easy, ARC-Challenge and MMLU by the offered letters'
logits; GSM8K, HumanEval (run in the sandbox) and SpellingBee by sampling and checking;
ChatCORE over the tasks run. Examples are sharded over Ray actors.

    python jobs/chat_eval.py --stage sft --preset cpu --max-per-task 20
    python jobs/chat_eval.py --stage mid --tasks GSM8K HumanEval --num-samples 8 --temperature 1.0
    ray job submit --working-dir . -- python jobs/chat_eval.py --stage sft --preset d20 --num-actors 8 --use-gpu

Writes <base dir>/evals/chat_<stage>_<tag>.json. Each finished task is kept in
chat_<stage>_<tag>.progress.json until then, so re-running after a crash skips it.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ray

from nanochat_ray.common import default_tokenizer_dir, eval_results_path, init_ray
from nanochat_ray.config import config_from_args
from nanochat_ray.evals.actors import run_chat, save_results, start_eval_actors
from nanochat_ray.evals.evaluator import Progress, eval_parser, evals_dir
from nanochat_ray.evals.chatcore import BASELINES


def main(argv: list[str] | None = None) -> dict:
    parser = eval_parser(__doc__)
    parser.add_argument("--stage", choices=["mid", "sft", "rl"], default="sft", help="which checkpoint to evaluate")
    parser.add_argument("--tasks", nargs="+", choices=list(BASELINES), default=list(BASELINES))
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem: pass@k")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.num_samples > 1 and args.temperature == 0:
        parser.error("--num-samples > 1 needs --temperature > 0: greedy samples are all the same")
    init_ray()
    start = time.time()
    actors = start_eval_actors(args.stage, cfg, args.tokenizer_dir or default_tokenizer_dir(), args.data_root,
                               args.num_actors, args.use_gpu, args.cpus_per_actor,
                               allow_untrained=args.allow_untrained)
    label = ray.get(actors[0].describe.remote())
    print(f"evaluating {label} on {', '.join(args.tasks)} ({args.max_per_task or 'all'} examples per task)")
    name = eval_results_path(args.stage, cfg.model_tag).stem
    options = dict(num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                   max_tokens=args.max_new_tokens)
    progress = Progress(evals_dir() / f"{name}.progress.json",
                        {"model": label, "max_per_task": args.max_per_task, **options, "config": cfg.to_dict()})
    results = run_chat(actors, args.tasks, args.data_root, args.max_per_task, progress, **options)
    print(f"ChatCORE {results['chatcore']:.4f} in {time.time() - start:.0f}s")
    results |= {"model": label, "stage": args.stage, "max_per_task": args.max_per_task,
                "num_samples": args.num_samples, "seconds": time.time() - start}
    print(f"results: {save_results(results, name)}")
    progress.finish()
    return results


if __name__ == "__main__":
    main()
