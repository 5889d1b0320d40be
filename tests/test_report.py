"""The report card from files alone: header, code statistics, stage sections, summary table, plots."""

import json
import subprocess
import sys
from pathlib import Path

from nanochat_ray.checkpoint import checkpoint_dir, save_checkpoint
from nanochat_ray.common import write_atomic
from nanochat_ray.report import read_metrics_log, summary_table, write_report

ROOT = Path(__file__).resolve().parents[1]


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def record(name: str, started: float, seconds: float, **extra) -> dict:
    return {"stage": name, "started_at": started, "finished_at": started + seconds, "seconds": seconds,
            "argv": ["--preset", "smoke"], "job": f"jobs/{name}.py", "headline": ["x", 1.0], **extra}


def make_root(root: Path) -> None:
    records = root / "speedrun"
    records.mkdir(parents=True)
    base = checkpoint_dir("base", "d2", root)
    step = save_checkpoint(base, 4, {}, None, {"config": {"depth": 2, "seed": 42}, "metrics": {"val_bpb": 3.1}})
    # a resumed run logs steps 3-4 twice: the report keeps each step once, the later line
    lines = [{"step": s, "loss_ema": 6.0 - s * 0.1, "loss": 6.0} for s in (1, 2, 3, 4)]
    lines += [{"step": 3, "loss_ema": 5.0}, {"step": 4, "loss_ema": 4.9, "val_bpb": 3.1}]
    (base / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_json(records / "tokenizer.json", record("tokenizer", 1000.0, 10.0, result={
        "vocab_size": 1024, "train_chars": 2_000_000, "train_seconds": 0.9, "compression": {"val": 2.5}}))
    write_json(records / "pretrain.json", record("pretrain", 1010.0, 60.0, resumed=True,
                                                        outputs=[str(step.relative_to(root))]))
    write_json(records / "base_eval.json", record("base_eval", 1070.0, 30.0))
    write_json(records / "sft_eval.json", record("sft_eval", 1100.0, 20.0))
    (root / "evals").mkdir()
    write_json(root / "evals" / "base_d2.json", {
        "model": "base d2 step 4", "train_bpb": 3.0, "val_bpb": 3.1, "core": -0.05, "max_per_task": 2,
        "core_tasks": {"copa": {"accuracy": 0.5, "centered": 0.0, "n": 2}}, "samples": {"The": " cat"}})
    write_json(root / "evals" / "chat_sft_d2.json", {
        "model": "sft d2 step 8", "max_per_task": 2, "chatcore": 0.125,
        "tasks": {"ARC-Easy": 0.5, "MMLU": 0.25, "GSM8K": 0.0, "SpellingBee": 1.0}})


def test_report_has_every_section_and_the_summary_numbers(tmp_path):
    make_root(tmp_path)
    run = {"started_at": 1000.0, "wall_seconds": 125.0, "preset": "smoke", "argv": ["--preset", "smoke"],
           "model_tag": "d2", "cluster_resources": {"CPU": 2.0, "nodes": 1}, "hourly_price": 36.0,
           "stages": ["tokenizer", "pretrain", "base_eval", "midtrain", "mid_eval", "sft", "sft_eval"]}
    path = write_report(tmp_path, run, ROOT)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    for expected in ("- date: 1970-01-01 00:16:40 UTC", "- git commit:", "- hardware (driver node):",
                     "- Ray cluster: CPU 2", "## Code statistics", "## Stages", "### tokenizer", "### pretrain",
                     "(resumed from its last checkpoint)", "`depth=2`", "val_bpb 3.1000", "### base_eval",
                     "| copa | 0.5000 | 0.0000 |", "### sft_eval", "Not finished: midtrain, mid_eval, sft.",
                     "## Summary", "![training curves](report/training.png)", "![report card](report/summary.png)"):
        assert expected in text, expected
    # first stage start (1000) to last stage end (1120): 2 minutes at $36/h = $1.20
    assert "- cost estimate: $1.20 (0.03 h at $36.00/h)" in text
    assert "Total wall clock time: 2m00s" in text
    assert "| CORE | -0.0500 |  |  |  |" in text
    assert "| ARC-Easy |  |  | 0.5000 |  |" in text
    assert "| ChatCORE |  |  | 0.1250 |  |" in text
    assert text.index("## Stages") < text.index("## Summary") < text.index("Total wall clock time")
    for plot in ("training.png", "summary.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_log_keeps_the_last_line_of_each_step(tmp_path):
    make_root(tmp_path)
    log = read_metrics_log(checkpoint_dir("base", "d2", tmp_path) / "metrics.jsonl")
    assert [e["step"] for e in log] == [1, 2, 3, 4] and log[2]["loss_ema"] == 5.0


def test_summary_table_without_evaluations_is_empty(tmp_path):
    assert all(values == {} for values in summary_table(tmp_path, "d2").values())


def test_report_module_does_not_import_ray():
    code = "import sys, nanochat_ray.report; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
