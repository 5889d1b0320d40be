"""
Time from `ray job submit` to the first optimizer step of `jobs/pretrain.py --preset cpu`, on a warm
`ray start --head` (goal <= 15 s), with the job's own breakdown of where the seconds go.

    python bench/startup.py                       # 3 submissions, tokenizer trained once (~1 min)
    python bench/startup.py --runs 5 --tokenizer-dir /tmp/tok65k --keep
    python bench/startup.py --runs 2 --baseline-dir /tmp/old-checkout   # this checkout and another in turns
    python bench/startup.py "--head-args=--system-config='{\"preload_python_modules\": [\"torch\"]}'"

It starts its own head (`ray start --head --block` in a process group of its own, on free ports and
its own temp dir, so other Ray sessions on the machine are untouched), trains the preset's tokenizer
once (or takes --tokenizer-dir), then submits the job --runs times with the `ray job submit` CLI,
each time with --fresh. The clock starts just before the CLI is launched and stops at step 1 by the
job's own clock (rank 0's time.time() when the step is done, on this machine); when the step's line
reaches the CLI's output is printed beside it (Ray forwards the job's log to the CLI with a tail
that polls the log once a second). The job prints a "startup:" line at its first step
(nanochat_ray/train/startup.py); its phases are shown per run. At the end the head's process group
is killed (never `ray stop`: it would stop every Ray on the machine).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from nanochat_ray.common import cpu_description

GOAL_SECONDS = 15.0
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
              "runtime-env-agent-port")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="job submissions on the one warm head")
    parser.add_argument("--steps", type=int, default=2, help="--num-iterations of each job (only step 1 is timed)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the head (default: os.cpu_count())")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--tokenizer-dir", default=None, help="a tokenizer with the cpu preset's vocab (default: "
                                                              "train one; kept with --keep for the next time)")
    parser.add_argument("--job-args", default="", help="extra flags for jobs/pretrain.py")
    parser.add_argument("--baseline-dir", default=None,
                        help="another checkout (e.g. `git archive` of an older commit): its job is submitted "
                             "in turn with this one's, for a before/after comparison on the same head")
    parser.add_argument("--head-args", default="",
                        help="extra flags for `ray start --head`, e.g. --system-config='{...}' to try a setting of "
                             "Ray's worker pool")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tokenizer, artifacts, head log)")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp: Path, num_cpus: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports in its own session; returns it and the dashboard URL."""
    from ray.job_submission import JobSubmissionClient

    ports = {name: free_port() for name in PORT_FLAGS}
    while True:  # a 200-port range for the workers that holds none of the ports above
        worker_ports = 30000 + free_port() % 20000
        if not any(worker_ports <= port <= worker_ports + 200 for port in ports.values()):
            break
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", str(num_cpus),
               "--temp-dir", str(temp / "ray"), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--disable-usage-stats", "--min-worker-port", str(worker_ports),
               "--max-worker-port", str(worker_ports + 200),
               *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))], *extra]
    log = temp / "head.log"
    head = subprocess.Popen(command, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address)
            return head, address
        except Exception:  # the dashboard is not up yet
            if head.poll() is not None or time.time() > deadline:
                raise SystemExit(f"ray start --head did not come up:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)


def stop_head(head: subprocess.Popen) -> None:
    """Kill the head's process group: its daemons and workers inherit it."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()


def train_tokenizer(data_root: Path, out: Path) -> None:
    import pyarrow.parquet as pq

    from nanochat_ray.config import make_config
    from nanochat_ray.tokenizer import Tokenizer

    cfg = make_config("cpu")
    shards = sorted((data_root / "pretrain_text").glob("shard_*.parquet"))[:-1]
    texts = (t for s in shards for t in pq.read_table(s, columns=["text"]).column("text").to_pylist())
    start = time.perf_counter()
    Tokenizer.train_from_iterator(texts, cfg.vocab_size, cfg.tokenizer_doc_cap, cfg.tokenizer_max_chars).save(out)
    print(f"tokenizer: vocab {cfg.vocab_size:,} trained in {time.perf_counter() - start:.1f} s", flush=True)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[str, float] | None:
    """(process title, CPU seconds so far) of a live process, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return title, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def process_kind(title: str) -> str:
    """A readable name for a process of the run: Ray's actors retitle themselves `ray::<Actor>.<method>`."""
    if title.startswith("ray::"):
        return title[5:].split(".")[0].split(" ")[0] or "ray worker"
    if " job submit " in title:  # (before the driver: its command line names jobs/pretrain.py too)
        return "`ray job submit` CLI"
    if "jobs/pretrain.py" in title:
        return "driver"
    if "default_worker.py" in title:
        return "ray worker (idle)"
    return "head daemons"


class CpuSampler:
    """CPU seconds of the head's processes (its session: daemons, the job's driver and actors) and of
    the CLI, sampled every 0.2 s; `snapshot()` sums them by kind, counting only what was used since
    the sampler started (the daemons' earlier CPU is not this run's)."""

    def __init__(self, session: int, cli: int):
        self.session, self.cli, self.base, self.last, self.titles = session, cli, {}, {}, {}
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.sample()
        self.base = dict(self.last)
        threading.Thread(target=self.run, daemon=True).start()

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:  # the job's driver runs in a session of its own, started (through a shell) by the job supervisor
                if pid != self.cli and self.session not in (os.getsid(pid), os.getsid(parent(pid)),
                                                            os.getsid(parent(parent(pid)))):
                    continue
            except (OSError, ValueError):
                continue
            found = process_cpu(pid)
            if found is not None:
                with self.lock:
                    self.titles[pid], self.last[pid] = found[0] or self.titles.get(pid, ""), found[1]

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.sample()

    def snapshot(self) -> dict[str, float]:
        self.sample()
        totals: dict[str, float] = {}
        with self.lock:
            for pid, seconds in self.last.items():
                kind = process_kind(self.titles[pid])
                totals[kind] = totals.get(kind, 0.0) + seconds - self.base.get(pid, 0.0)
        self.stopped.set()
        return dict(sorted(((k, v) for k, v in totals.items() if v >= 0.05), key=lambda kv: -kv[1]))


def submit(address: str, base: Path, data_root: Path, tokenizer_dir: Path, args: argparse.Namespace,
           head: subprocess.Popen, checkout: Path = REPO) -> dict:
    """One `ray job submit`; returns seconds to step 1, the job's startup breakdown and the CPU
    seconds of every process of the head and the CLI until then."""
    runtime_env = {"env_vars": {"NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA": str(data_root),
                                "RAY_API_SERVER_ADDRESS": address},
                   "excludes": [".git", ".venv", "**/__pycache__"]}
    command = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", address,
               "--working-dir", str(checkout), "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "jobs/pretrain.py", "--preset", "cpu", "--num-iterations", str(args.steps), "--fresh",
               "--tokenizer-dir", str(tokenizer_dir), "--sample-every", "0", "--eval-every", "0",
               *args.job_args.split()]
    submitted = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    sampler = CpuSampler(head.pid, process.pid)
    first_step, breakdown, tail, cpu = None, None, [], {}
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if first_step is None and re.search(r"step 0*1/", line):
            first_step = time.time() - submitted
            cpu = sampler.snapshot()
        if "startup:" in line and "{" in line:
            breakdown = json.loads(line[line.index("{"):])
    sampler.stopped.set()
    if process.wait() != 0 or first_step is None:
        raise SystemExit(f"the job failed (exit {process.returncode}):\n{''.join(tail)}")
    # the step's own time (rank 0's clock, this machine's): its line reaches the CLI later, through
    # Ray's log forwarding, whose job-log tail polls once a second
    step1 = breakdown["marks"]["step1"] - submitted if breakdown else first_step
    return {"step1": step1, "line_at_cli": first_step, "breakdown": breakdown, "submitted": submitted, "cpu": cpu}


def show(label: str, r: dict) -> None:
    """One run: seconds to step 1, the job's phases, and the CPU seconds by process until step 1."""
    phases = r["breakdown"] or {}
    shown = " | ".join(f"{name} {seconds:.1f}" for name, seconds in phases.get("phases", {}).items())
    driver = f"submit -> driver {phases['marks']['process'] - r['submitted']:.1f} | " if phases else ""
    cpu = " | ".join(f"{kind} {seconds:.1f}" for kind, seconds in r["cpu"].items())
    print(f"{label}: submit -> step 1 {r['step1']:.1f} s (its line at the CLI {r['line_at_cli']:.1f} s)"
          + (f"  [{driver}{shown}; pipeline first rows {phases.get('pipeline first rows', float('nan')):.1f}]"
             if shown else "  (the job printed no startup breakdown)")
          + f"; load avg {os.getloadavg()[0]:.1f}\n    CPU s until step 1: {sum(r['cpu'].values()):.1f} = {cpu}",
          flush=True)


def summary(results: list[dict]) -> None:
    """Median, min and max to step 1; median per phase and median CPU seconds."""
    firsts = [r["step1"] for r in results]
    print(f"  median {statistics.median(firsts):.1f} s, min {min(firsts):.1f}, max {max(firsts):.1f} "
          f"(goal <= {GOAL_SECONDS:.0f} s); the step's line at the CLI: median "
          f"{statistics.median(r['line_at_cli'] for r in results):.1f} s; median CPU s until step 1 "
          f"{statistics.median(sum(r['cpu'].values()) for r in results):.1f}")
    with_phases = [r["breakdown"]["phases"] for r in results if r["breakdown"]]
    if with_phases:
        print("  median per phase (s): " + " | ".join(
            f"{name} {statistics.median(p.get(name, float('nan')) for p in with_phases):.1f}"
            for name in with_phases[-1]))


def main() -> None:
    args = parse_args()
    data_root = Path(args.data_root).resolve()
    temp = Path(tempfile.mkdtemp(prefix="nc-start-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head = None
    try:
        tokenizer_dir = Path(args.tokenizer_dir).resolve() if args.tokenizer_dir else temp / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").exists():
            train_tokenizer(data_root, tokenizer_dir)
        t = time.perf_counter()
        head, address = start_head(temp, args.num_cpus or os.cpu_count(), shlex.split(args.head_args))
        print(f"head: ray start --head up in {time.perf_counter() - t:.1f} s at {address}; "
              f"load avg {os.getloadavg()[0]:.1f}", flush=True)
        results, baseline = [], []
        for run in range(args.runs):
            # interleaved, so that both see the same machine load, and taking turns at going first (the
            # head's first job also starts Ray Data's shared actors)
            for is_baseline in ((True, False) if run % 2 == 0 else (False, True)) if args.baseline_dir else (False,):
                if is_baseline:
                    baseline.append(submit(address, temp / "baseline", data_root, tokenizer_dir, args, head,
                                           Path(args.baseline_dir).resolve()))
                    show(f"run {run + 1} baseline", baseline[-1])
                else:
                    results.append(submit(address, temp / "artifacts", data_root, tokenizer_dir, args, head))
                    show(f"run {run + 1}", results[-1])
        if baseline:
            print(f"\nbaseline ({args.baseline_dir}):")
            summary(baseline)
            print(f"this checkout: ratio {statistics.median(r['step1'] for r in baseline) / statistics.median(r['step1'] for r in results):.2f}x")
        print(f"\nsubmit -> first step, cpu preset, {len(results)} runs on one warm head ({cpu_description()}):")
        summary(results)
    finally:
        if head is not None:
            stop_head(head)
        if args.keep:
            print(f"kept {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
