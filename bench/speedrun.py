"""
Speedrun benchmark: wall time of every stage and of the whole run, the overlap won (sum of stage
times vs wall time), and how much of the machine the run had.

    python bench/speedrun.py                       # cpu preset, fresh artifact root, evals beside training
    python bench/speedrun.py --no-overlap          # every stage one after another
    python bench/speedrun.py --preset smoke -- --stage-args "pretrain=--num-iterations 20"

Runs jobs/speedrun.py in this process on a local Ray, with a fresh artifact root (the data comes
from NANOCHAT_DATA or --data-root). While it runs, a thread samples the CPU time of this process
tree (driver, Ray daemons, workers, actors) and of the whole machine once a second. Other work on
the machine shows as CPU time that is not ours; "quiet estimate" subtracts it, spread over the
cores, from each wall time — a rough figure for an idle machine.
"""

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ray

from nanochat_ray.common import format_seconds, read_json
from nanochat_ray.report import RECORDS_DIR

TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, str, float]]:
    """{pid: (parent pid, start time, CPU seconds of the process itself)}."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        ppid, utime, stime, started = int(fields[1]), int(fields[11]), int(fields[12]), fields[19]
        table[int(entry)] = (ppid, started, (utime + stime) / TICKS)
    return table


class TreeCpu:
    """CPU seconds of a process and all its descendants, the ones that already exited included.

    Each descendant's own CPU time is remembered from its last sample (a dead actor's time does
    not always reach its parent's counters: Ray workers are not all reaped by the raylet).
    """

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[tuple[int, str], float] = {}  # (pid, start time) → last CPU seconds

    def sample(self) -> float:
        table = process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in table:
                _, started, cpu = table[pid]
                self.seen[(pid, started)] = cpu
            stack.extend(children.get(pid, []))
        return sum(self.seen.values())


def machine_busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


class CpuSampler(threading.Thread):
    """(time, our CPU seconds, machine busy CPU seconds) once a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []
        self.running = True
        self.tree = TreeCpu(os.getpid())

    def sample(self) -> None:
        self.samples.append((time.time(), self.tree.sample(), machine_busy_seconds()))

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(1.0)

    def stop(self) -> None:
        self.running = False
        self.join()
        self.sample()

    def at(self, t: float) -> tuple[float, float]:
        """(ours, machine) at time t, from the nearest sample at or before it (our counter only grows)."""
        best = self.samples[0]
        for sample in self.samples:
            if sample[0] <= t:
                best = sample
        return best[1], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("speedrun_args", nargs="*", help="more flags for jobs/speedrun.py (after --)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench_speedrun_"))
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    # see bench/pretrain.py start_ray: no dashboard, so Ray Train's cleaner must not find another one
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": str(base), "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    from jobs import speedrun

    load_before = os.getloadavg()
    sampler = CpuSampler()
    sampler.start()
    start = time.time()
    result = speedrun.main(["--preset", args.preset, "--overlap" if args.overlap else "--no-overlap",
                            *args.speedrun_args])
    wall = time.time() - start
    sampler.stop()
    load_after = os.getloadavg()
    ray.shutdown()

    cores = os.cpu_count()
    records = [read_json(base / RECORDS_DIR / f"{row['stage']}.json") for row in result["summary"]]
    print(f"\nspeedrun benchmark: {args.preset} preset, overlap {'on' if args.overlap else 'off'}, "
          f"{cores} cores, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; artifacts {base}")
    print(f"{'stage':<12}{'start':>8}{'wall':>9}{'our CPU':>10}{'others':>9}{'quiet est.':>12}  headline")
    for record in records:
        ours0, machine0 = sampler.at(record["started_at"])
        ours1, machine1 = sampler.at(record["finished_at"])
        others = max(0.0, (machine1 - machine0) - (ours1 - ours0))
        quiet = max((ours1 - ours0) / cores, record["seconds"] - others / cores)
        name, value = record["headline"]
        print(f"{record['stage']:<12}{format_seconds(record['started_at'] - start):>8}"
              f"{format_seconds(record['seconds']):>9}{ours1 - ours0:>9.0f}s{others:>8.0f}s"
              f"{format_seconds(quiet):>12}  {name} {value:.4f}")
    ours0, machine0 = sampler.samples[0][1:]
    ours1, machine1 = sampler.samples[-1][1:]
    others = max(0.0, (machine1 - machine0) - (ours1 - ours0))
    stage_sum = sum(r["seconds"] for r in records)
    print(f"total wall {format_seconds(wall)} (report included); sum of stage times {format_seconds(stage_sum)}; "
          f"overlap won {format_seconds(max(0.0, stage_sum - result['wall_seconds']))}")
    print(f"CPU: ours {ours1 - ours0:.0f}s, other processes {others:.0f}s over {cores} cores; "
          f"quiet-machine estimate {format_seconds(max((ours1 - ours0) / cores, wall - others / cores))}")


if __name__ == "__main__":
    main()
