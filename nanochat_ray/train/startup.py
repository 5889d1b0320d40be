"""
Where the seconds before the first optimizer step go: marks taken on the driver (jobs/pretrain.py,
train/pretrain.py, train/worker.py's fit) and on rank 0, printed as phases at step 1.

    startup.mark("ray init")          # on the driver; fit() hands the marks to the workers
    print(startup.format_breakdown(marks))

bench/startup.py reads the printed line and adds the time from `ray job submit` to the driver.
"""

import json
import os
import time

MARKS: dict[str, float] = {}  # this driver process's marks, time.time() each

# (phase, mark it ends at, mark it starts at): one after the other on the way to step 1
# ("process": the job module's first line, before its imports; "worker process": when the Ray Train
# worker's process started, so the worker group's start splits into Ray Train's controller (it
# starts, places the group and creates the worker actor) and the worker's own start-up (Python,
# Ray, Ray Train and torch imports, Train context, process group))
PHASES = (("driver start", "main", "process"), ("ray init", "ray", "main"), ("checks", "fit", "ray"),
          ("train controller", "worker process", "fit"), ("worker start-up", "worker", "worker process"),
          ("model build", "loop", "worker"), ("first step", "step1", "loop"))
WHOLE_GROUP = ("worker group start", "worker", "fit")  # the two together, where the process start is unknown


def process_start_time() -> float | None:
    """time.time() at which this process started (Linux: /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
            age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - age


def mark(name: str, at: float | None = None) -> None:
    """Note that `name` happened now, or `at` (the first time only: a re-run keeps the first)."""
    MARKS.setdefault(name, time.time() if at is None else at)


def breakdown(marks: dict[str, float]) -> dict:
    """Seconds per phase, the total from the process start, and the pipeline's first rows (it runs
    beside the phases: started by the driver before the workers)."""
    phases = {name: marks[end] - marks[start] for name, end, start in
              (PHASES if "worker process" in marks else PHASES[:3] + (WHOLE_GROUP,) + PHASES[5:])
              if start in marks and end in marks}
    result = {"phases": phases, "total": marks["step1"] - min(marks.values())}  # from the earliest mark
    if "pipeline" in marks and "rows" in marks:
        result["pipeline first rows"] = marks["rows"] - marks["pipeline"]
    return result


def format_breakdown(marks: dict[str, float]) -> str:
    """Two lines: readable, then `startup: {json}` for bench/startup.py."""
    b = breakdown(marks)
    readable = " | ".join(f"{name} {seconds:.1f}" for name, seconds in b["phases"].items())
    pipeline = (f" (beside them: data pipeline first rows {b['pipeline first rows']:.1f} s after the driver "
                f"started it)" if "pipeline first rows" in b else "")
    return (f"start-up: {b['total']:.1f} s from the driver's launch to step 1 = {readable} s{pipeline}\n"
            f"startup: {json.dumps(b | {'marks': marks})}")
