"""
Quality at CPU scale against the reference's own anchor (issue 15): the same recipe the reference
nanochat ran on a 2-core machine, then a short midtraining + SFT chain with its chat evaluation.

    python bench/quality.py                                   # everything, in a temp dir
    python bench/quality.py --keep /tmp/q                     # keep the artifacts (tokenizer, checkpoints)
    python bench/quality.py --reuse-base /tmp/q --work /tmp/q2  # the chain again from a kept base checkpoint
    python bench/quality.py --skip-chain --dtype float32; ... --dtype bfloat16  # bf16 within 0.01 bpb of fp32

Pretraining: depth 4 (the cpu preset), 1 × 1,024 tokens per step, 300 steps on the mirror's
pretrain_text shards, val bpb over the first 65,536 tokens of the val shard (the last shard).
The reference measured val bpb 2.4105 and 2.4111 (two runs) this way; ours must be ≤ 2.42.
The tokenizer is the cpu preset's: vocab 65,536 trained on the train shards by jobs/tokenizer.py.

Chain: --mid-steps midtraining steps and --sft-steps SFT steps (cpu preset batches), each
printing its val bpb, then jobs/chat_eval.py on the mid and the SFT checkpoints with
--max-per-task problems per task and at most 128 new tokens per answer (greedy).

Every stage is the project's own job (jobs/*.py main()) in one local Ray session, with
NANOCHAT_BASE_DIR pointing at the work dir. Timings on a shared machine mean nothing; the
figures printed at the end are the quality numbers.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

ANCHOR_BPB = (2.4105, 2.4111)  # the reference, same recipe, two runs
TARGET_BPB = 2.42


def parse_args() -> argparse.Namespace:
    default_data = os.environ.get("NANOCHAT_DATA", str(REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=default_data, help="mirror laid out like shared/data")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--mid-steps", type=int, default=50)
    parser.add_argument("--sft-steps", type=int, default=50)
    parser.add_argument("--max-per-task", type=int, default=12, help="chat-eval problems per task")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the training worker (torch threads)")
    parser.add_argument("--work", type=Path, default=None, help="artifact dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--reuse-base", type=Path, default=None,
                        help="a work dir of an earlier run: copy its tokenizer and base checkpoint, skip pretraining")
    parser.add_argument("--skip-chain", action="store_true", help="pretraining only")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="compute dtype of every stage (auto: bf16 on CPUs with native bf16, else fp32)")
    return parser.parse_args()


def main() -> dict:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["NANOCHAT_BASE_DIR"] = str(work)  # read by base_dir() at call time
    from jobs import chat_eval, midtrain, pretrain, sft, tokenizer

    data = ["--data-root", args.data_root]
    train = data + ["--preset", "cpu", "--cpus-per-worker", str(args.cpus), "--core-every", "-1",
                    "--sample-every", "-1", "--eval-tokens", "65536", "--dtype", args.dtype]
    figures: dict = {"work": str(work), "dtype": args.dtype}
    if args.reuse_base:
        from nanochat_ray.checkpoint import checkpoint_dir, load_checkpoint
        for name in ("tokenizer", "checkpoints/base"):
            shutil.copytree(args.reuse_base / name, work / name, dirs_exist_ok=True)
        _, _, meta = load_checkpoint(checkpoint_dir("base", "d4", work), load_optimizer=False)
        figures["base"] = {"val_bpb": meta["metrics"]["val_bpb"], "steps": meta["step"], "from": str(args.reuse_base)}
    else:
        if not (work / "tokenizer" / "tokenizer.json").exists():
            tokenizer.main(data + ["--preset", "cpu"])
        result = pretrain.main(train + ["--num-iterations", str(args.steps), "--eval-every", "100",
                                        "--save-every", str(args.steps)])
        figures["base"] = {"val_bpb": result["metrics"]["val_bpb"], "steps": args.steps}
    print(f"[quality] base val bpb {figures['base']['val_bpb']:.4f} after {figures['base']['steps']} steps "
          f"(reference {ANCHOR_BPB[0]} / {ANCHOR_BPB[1]}; target ≤ {TARGET_BPB})", flush=True)
    if not args.skip_chain:
        for stage, job, steps in (("mid", midtrain, args.mid_steps), ("sft", sft, args.sft_steps)):
            result = job.main(train + ["--num-iterations", str(steps), "--eval-every", str(steps),
                                       "--save-every", str(steps), "--fresh"])
            figures[stage] = {"val_bpb": result["metrics"]["val_bpb"], "steps": steps}
            print(f"[quality] {stage} val bpb {figures[stage]['val_bpb']:.4f} after {steps} steps", flush=True)
        for stage in ("mid", "sft"):
            scores = chat_eval.main(data + ["--preset", "cpu", "--stage", stage, "--max-per-task",
                                            str(args.max_per_task), "--max-new-tokens", "128",
                                            "--num-actors", "2"])
            figures[stage]["chat"] = scores["tasks"] | {"ChatCORE": scores["chatcore"]}
            print(f"[quality] {stage} chat eval: {json.dumps(scores['tasks'])} "
                  f"ChatCORE {scores['chatcore']:.4f}", flush=True)
    (work / "quality.json").write_text(json.dumps(figures, indent=1, default=str))
    print("[quality] " + json.dumps(figures, default=str))
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
