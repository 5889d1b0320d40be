"""The start-up breakdown printed at step 1 (train/startup.py) and read back by bench/startup.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat_ray.train.startup import breakdown, format_breakdown

MARKS = {"process": 100.0, "main": 101.5, "ray": 102.0, "pipeline": 102.2, "fit": 102.5, "worker process": 104.5,
         "worker": 106.0, "rows": 104.0, "loop": 107.0, "step1": 108.25}


def test_phases_follow_one_another_and_sum_to_the_total():
    b = breakdown(MARKS)
    assert b["phases"] == pytest.approx({"driver start": 1.5, "ray init": 0.5, "checks": 0.5, "train controller": 2.0,
                                         "worker start-up": 1.5, "model build": 1.0, "first step": 1.25})
    assert sum(b["phases"].values()) == pytest.approx(b["total"]) == pytest.approx(8.25)
    assert b["pipeline first rows"] == pytest.approx(1.8)  # beside the phases, from the driver's start of it


def test_printed_line_reads_back():
    readable, machine = format_breakdown(MARKS).splitlines()
    assert readable.startswith("start-up: 8.2 s from the driver's launch to step 1 = driver start 1.5 |")
    assert json.loads(machine.removeprefix("startup: "))["marks"] == MARKS


def test_missing_marks_leave_their_phases_out():
    b = breakdown({"fit": 1.0, "worker": 2.0, "loop": 2.5, "step1": 3.0})  # e.g. a sweep's trial: no job marks
    assert list(b["phases"]) == ["worker group start", "model build", "first step"] and b["total"] == 2.0
    assert "pipeline first rows" not in b


def test_a_process_knows_when_it_started():
    # a fresh interpreter: its start comes before its first line runs, and less than a few seconds before
    code = "import time; now = time.time(); from nanochat_ray.train.startup import process_start_time; " \
           "print(now, process_start_time())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    first_line, started = map(float, out.split())
    assert 0 <= first_line - started < 5


def test_the_mfu_probe_starts_after_step_1(monkeypatch):
    import torch

    from nanochat_ray.train import worker

    probes = []
    monkeypatch.setattr(worker, "peak_flops", lambda device, dtype: probes.append(dtype) or 1e12)
    peak = worker.background_peak_flops(torch.device("cpu"), torch.float32)
    assert probes == []  # nothing measured on the way to step 1
    assert peak() is None  # step 1: the probe starts now
    assert peak() == 1e12 and probes == [torch.float32]  # step 2 waits for it
    assert peak() == 1e12 and len(probes) == 1
