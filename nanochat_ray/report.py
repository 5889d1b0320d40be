"""
The report card (SPEC §12): report.md in the artifact root, with PNG plots beside it in report/.

    python jobs/speedrun.py --only report        # rewrite it from what the last runs left

Reads files only: the speedrun's stage records (<root>/speedrun/<stage>.json), each training
stage's final checkpoint meta.json and metrics.jsonl, and the evaluations' JSON files. The caller
passes what only a running cluster knows (its resources) and this run's own facts.
"""

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from nanochat_ray.checkpoint import STAGES, TRAIN_JOBS
from nanochat_ray.common import eval_results_path, format_seconds, read_json, write_atomic

RECORDS_DIR = "speedrun"  # <root>/speedrun/<stage>.json: one record per finished stage
REPORT_FILE = "report.md"
PLOTS_DIR = "report"
TRAINING = {job: stage for stage, job in TRAIN_JOBS.items()}  # speedrun stage → checkpoint stage
CHAT_EVALS = {f"{stage}_eval": stage for stage in STAGES[1:]}  # speedrun stage → the checkpoint it evaluates
COLUMNS = STAGES
# the rows of the reference's report card (SPEC, headline table)
SUMMARY_ROWS = ("CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE")
CODE_DIRS = ("nanochat_ray", "jobs", "serve", "bench", "tests")


def read_metrics_log(path: Path) -> list[dict]:
    """metrics.jsonl with one entry per step: a step run again after a resume keeps its last line."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_step[entry.get("step")] = entry
    return [by_step[s] for s in sorted(k for k in by_step if k is not None)]


# -----------------------------------------------------------------------------
# what the report is made of


def stage_records(root: Path) -> dict[str, dict]:
    return {p.stem: read_json(p) for p in sorted((root / RECORDS_DIR).glob("*.json"))
            if not p.name.endswith(".started.json") and p.stem != "run"}


def summary_table(root: Path, model_tag: str) -> dict[str, dict[str, float]]:
    """{row: {column: value}} of the report card, from the evaluation files present."""
    table: dict[str, dict[str, float]] = {row: {} for row in SUMMARY_ROWS}
    base = read_json(eval_results_path("base", model_tag, root), default=None)
    if base:
        table["CORE"]["base"] = base["core"]
    for column in COLUMNS[1:]:
        chat = read_json(eval_results_path(column, model_tag, root), default=None)
        if chat:
            for task, accuracy in chat["tasks"].items():
                if task in table:
                    table[task][column] = accuracy
            table["ChatCORE"][column] = chat["chatcore"]
    return table


def git_commit(repo: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout here)"


def hardware() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gpu_text = f"{len(gpus)} × {gpus[0]}" if gpus else "none"
    return f"{os.cpu_count()} × {cpu}, {memory:.0f} GiB RAM, GPUs: {gpu_text}"


def code_statistics(repo: Path) -> dict[str, int]:
    files = [p for d in CODE_DIRS for p in sorted((repo / d).rglob("*.py"))]
    text = [p.read_text(errors="replace") for p in files]
    return {"files": len(files), "lines": sum(t.count("\n") for t in text), "characters": sum(len(t) for t in text)}


# -----------------------------------------------------------------------------
# plots


def plot_training(root: Path, records: dict, path: Path) -> bool:
    """Training loss and validation bits per byte against the step, one line per stage."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    logs = {name: read_metrics_log(root / Path(records[name]["outputs"][0]).parent / "metrics.jsonl")
            for name in TRAINING if name in records and records[name].get("outputs")}
    logs = {name: log for name, log in logs.items() if log}
    if not logs:
        return False
    rewards = {name: [e for e in log if "mean_reward" in e] for name, log in logs.items()}
    rewards = {name: entries for name, entries in rewards.items() if entries}
    fig, axes = plt.subplots(1, 3 if rewards else 2, figsize=(15 if rewards else 11, 4))
    loss_ax, bpb_ax = axes[0], axes[1]
    for name, log in logs.items():
        losses = [e for e in log if "loss_ema" in e]
        if losses:
            loss_ax.plot([e["step"] for e in losses], [e["loss_ema"] for e in losses], label=name)
        val = [e for e in log if "val_bpb" in e]
        if val:
            bpb_ax.plot([e["step"] for e in val], [e["val_bpb"] for e in val], marker="o", label=name)
    loss_ax.set(title="training loss (EMA)", xlabel="step", ylabel="loss (nats/token)")
    bpb_ax.set(title="validation bits per byte", xlabel="step", ylabel="bpb")
    if rewards:
        for name, entries in rewards.items():
            axes[2].plot([e["step"] for e in entries], [e["mean_reward"] for e in entries], label=name)
        axes[2].set(title="RL mean reward", xlabel="step", ylabel="reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_summary(table: dict[str, dict[str, float]], path: Path) -> bool:
    """The report card as grouped bars: one group per metric, one bar per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in COLUMNS if any(c in values for values in table.values())]
    if not columns:
        return False
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        xs = [r + i * width for r in range(len(SUMMARY_ROWS))]
        ax.bar(xs, [table[row].get(column, 0.0) for row in SUMMARY_ROWS], width, label=column.upper())
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(SUMMARY_ROWS))], SUMMARY_ROWS)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title="report card (CORE and ChatCORE are baseline-centered)", ylabel="score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# markdown


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def _config_lines(config: dict) -> list[str]:
    """The fields that differ from the d20 defaults: with those defaults, the whole config."""
    from nanochat_ray.config import Config
    defaults = Config().to_dict()
    changed = {k: v for k, v in config.items() if defaults.get(k) != v}
    return [f"- config (d20 defaults except): " + (", ".join(f"`{k}={v}`" for k, v in changed.items()) or "none")]


def stage_section(root: Path, name: str, record: dict, model_tag: str) -> list[str]:
    lines = [f"### {name}", "",
             f"- time: {format_seconds(record['seconds'])}"
             + (" (resumed from its last checkpoint)" if record.get("resumed") else "")
             + f", finished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record['finished_at']))}",
             f"- command: `{record.get('job', name)} {' '.join(record.get('argv', []))}`"]
    result = record.get("result", {})
    if name == "tokenizer":
        lines.append(f"- vocab {_number(result.get('vocab_size'))}, trained on {_number(result.get('train_chars'))} "
                     f"characters in {_number(result.get('train_seconds'))}s")
        lines.append("- compression (UTF-8 bytes per token): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in result.get("compression", {}).items()))
    elif name in TRAINING and record.get("outputs"):
        meta = read_json(root / record["outputs"][0] / "meta.json", default={})
        lines += _config_lines(meta.get("config", {}))
        metrics = meta.get("metrics", {})
        lines.append(f"- final step {meta.get('step')}: "
                     + ", ".join(f"{k} {_number(v)}" for k, v in metrics.items() if k != "step"))
    elif name == "base_eval":
        base = read_json(eval_results_path("base", model_tag, root), default={})
        lines.append(f"- {base.get('model')}: train bpb {_number(base.get('train_bpb'))}, val bpb "
                     f"{_number(base.get('val_bpb'))}, CORE {_number(base.get('core'))} "
                     f"({base.get('max_per_task') or 'all'} examples per task)")
        lines += ["", "| CORE task | accuracy | centered |", "|---|---|---|"]
        lines += [f"| {task} | {v['accuracy']:.4f} | {v['centered']:.4f} |"
                  for task, v in base.get("core_tasks", {}).items()]
        lines += ["", "Samples:", ""] + [f"- `{p}` → `{t}`" for p, t in base.get("samples", {}).items()]
    elif name in CHAT_EVALS:
        chat = read_json(eval_results_path(CHAT_EVALS[name], model_tag, root), default={})
        lines.append(f"- {chat.get('model')}, {chat.get('max_per_task') or 'all'} examples per task: "
                     + ", ".join(f"{t} {a:.4f}" for t, a in chat.get("tasks", {}).items())
                     + f"; ChatCORE {_number(chat.get('chatcore'))}")
    else:
        lines.append("- metrics: " + ", ".join(f"{k} {_number(v)}" for k, v in result.get("metrics", {}).items()))
    return lines + [""]


def render_table(table: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| Metric | " + " | ".join(c.upper() for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in SUMMARY_ROWS:
        lines.append(f"| {row} | " + " | ".join(f"{table[row][c]:.4f}" if c in table[row] else ""
                                                for c in COLUMNS) + " |")
    return lines


def write_report(root: Path, run: dict, repo: Path) -> Path:
    """Write <root>/report.md and its plots; return the report's path.

    `run` holds this submission's facts: started_at, wall_seconds, preset, argv, model_tag,
    cluster_resources, hourly_price and stages (the ones in this speedrun, in order).
    """
    root = Path(root)
    records = stage_records(root)
    records = {name: records[name] for name in run["stages"] if name in records}
    plots = root / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    table = summary_table(root, run["model_tag"])
    have_training_plot = plot_training(root, records, plots / "training.png")
    have_summary_plot = plot_summary(table, plots / "summary.png")

    # the speedrun's span: first stage start to last stage end, over every submission it took
    span = (max(r["finished_at"] for r in records.values()) - min(r["started_at"] for r in records.values())
            if records else 0.0)
    stage_seconds = sum(r["seconds"] for r in records.values())
    price = run.get("hourly_price")
    cost = f"${price * span / 3600:,.2f} ({span / 3600:.2f} h at ${price:,.2f}/h)" if price else \
        "not estimated (pass --hourly-price)"
    resources = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in run.get("cluster_resources", {}).items())
    code = code_statistics(repo)
    missing = [name for name in run["stages"] if name not in records]

    lines = [f"# nanochat-ray speedrun report: {run['preset']} preset ({run['model_tag']})", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(run['started_at']))}",
             f"- git commit: {git_commit(repo)}",
             f"- hardware (driver node): {hardware()}",
             f"- Ray cluster: {resources or 'unknown'}",
             f"- command: `python jobs/speedrun.py {' '.join(run.get('argv', []))}`",
             f"- cost estimate: {cost}", "",
             "## Code statistics", "",
             f"{code['files']} Python files, {code['lines']:,} lines, {code['characters']:,} characters "
             f"({', '.join(CODE_DIRS)}).", "",
             "## Stages", ""]
    for name, record in records.items():
        lines += stage_section(root, name, record, run["model_tag"])
    if missing:
        lines += [f"Not finished: {', '.join(missing)}.", ""]
    if have_training_plot:
        lines += [f"![training curves]({PLOTS_DIR}/training.png)", ""]
    lines += ["## Summary", "", *render_table(table), ""]
    if have_summary_plot:
        lines += [f"![report card]({PLOTS_DIR}/summary.png)", ""]
    lines += [f"Total wall clock time: {format_seconds(span)} (first stage start to last stage end); "
              f"time in stages {format_seconds(stage_seconds)}; this submission {format_seconds(run['wall_seconds'])}."]
    path = root / REPORT_FILE
    write_atomic(path, "\n".join(lines) + "\n")
    return path
