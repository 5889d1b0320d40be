"""
Time from `ray job submit` to the first optimizer step of `jobs/pretrain.py --preset cpu`, on a warm
`ray start --head` (goal <= 15 s), with the job's own breakdown of where the seconds go.

    python bench/startup.py                       # 3 submissions, tokenizer trained once (~1 min)
    python bench/startup.py --runs 5 --tokenizer-dir /tmp/tok65k --keep

It starts its own head (`ray start --head --block` in a process group of its own, on free ports and
its own temp dir, so other Ray sessions on the machine are untouched), trains the preset's tokenizer
once (or takes --tokenizer-dir), then submits the job --runs times with the `ray job submit` CLI,
each time with --fresh. The clock starts just before the CLI is launched and stops when the job's
"step 00001" line reaches the CLI's output. The job prints a "startup:" line at its first step
(nanochat_ray/train/startup.py); its phases are shown per run. At the end the head's process group
is killed (never `ray stop`: it would stop every Ray on the machine).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tokenizer, artifacts, head log)")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp: Path, num_cpus: int) -> tuple[subprocess.Popen, str]:
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
               *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))]]
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


def submit(address: str, base: Path, data_root: Path, tokenizer_dir: Path, args: argparse.Namespace,
           checkout: Path = REPO) -> dict:
    """One `ray job submit`; returns seconds to step 1 and the job's startup breakdown."""
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
    first_step, breakdown, tail = None, None, []
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if first_step is None and re.search(r"step 0*1/", line):
            first_step = time.time() - submitted
        if "startup:" in line and "{" in line:
            breakdown = json.loads(line[line.index("{"):])
    if process.wait() != 0 or first_step is None:
        raise SystemExit(f"the job failed (exit {process.returncode}):\n{''.join(tail)}")
    return {"first_step": first_step, "breakdown": breakdown, "submitted": submitted}


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
        head, address = start_head(temp, args.num_cpus or os.cpu_count())
        print(f"head: ray start --head up in {time.perf_counter() - t:.1f} s at {address}; "
              f"load avg {os.getloadavg()[0]:.1f}", flush=True)
        results, baseline = [], []
        for run in range(args.runs):
            if args.baseline_dir:  # interleaved, so that both see the same machine load
                b = submit(address, temp / "baseline", data_root, tokenizer_dir, args, Path(args.baseline_dir).resolve())
                baseline.append(b["first_step"])
                print(f"run {run + 1}: baseline submit -> step 1 {b['first_step']:.1f} s; "
                      f"load avg {os.getloadavg()[0]:.1f}", flush=True)
            r = submit(address, temp / "artifacts", data_root, tokenizer_dir, args)
            results.append(r)
            phases = r["breakdown"] or {}
            shown = " | ".join(f"{name} {seconds:.1f}" for name, seconds in phases.get("phases", {}).items())
            driver = f"submit -> driver {phases['marks']['process'] - r['submitted']:.1f} | " if phases else ""
            print(f"run {run + 1}: submit -> step 1 {r['first_step']:.1f} s"
                  + (f"  [{driver}{shown}; pipeline first rows {phases.get('pipeline first rows', float('nan')):.1f}]"
                     if shown else "  (the job printed no startup breakdown)")
                  + f"; load avg {os.getloadavg()[0]:.1f}", flush=True)
        firsts = [r["first_step"] for r in results]
        if baseline:
            print(f"\nbaseline ({args.baseline_dir}): median {statistics.median(baseline):.1f} s; this checkout: "
                  f"median {statistics.median(firsts):.1f} s; ratio {statistics.median(baseline) / statistics.median(firsts):.2f}x")
        print(f"\nsubmit -> first step, cpu preset, {len(firsts)} runs on one warm head ({cpu_description()}): median {statistics.median(firsts):.1f} s, min {min(firsts):.1f}, "
              f"max {max(firsts):.1f} (goal <= {GOAL_SECONDS:.0f} s)")
        with_phases = [r["breakdown"]["phases"] for r in results if r["breakdown"]]
        if with_phases:
            print("median per phase (s): " + " | ".join(
                f"{name} {statistics.median(p[name] for p in with_phases):.1f}" for name in with_phases[0]))
    finally:
        if head is not None:
            stop_head(head)
        if args.keep:
            print(f"kept {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
