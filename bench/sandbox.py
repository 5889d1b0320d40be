"""
HumanEval sandbox throughput: canonical solutions checked per second, one at a time and with N
parallel workers (threads, each waiting on its own sandboxed interpreter).

    python bench/sandbox.py                          # all 164 problems, 1, 2 and 4 workers
    python bench/sandbox.py --workers 1 8 --problems 50 --data-root ../shared/data

Also prints the floor: a bare `python -I -S -B -c pass` start-up, which most of a run is.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.evals.sandbox import run_program
from nanochat_ray.tasks import HumanEval, humaneval_program


def parse_args() -> argparse.Namespace:
    repo_root = Path(__file__).resolve().parents[1]
    default_data = os.environ.get("NANOCHAT_DATA", str(repo_root.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=default_data)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="parallel sandboxes, one pass each")
    parser.add_argument("--problems", type=int, default=164, help="first N HumanEval problems")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # each conversation's answer is the canonical solution (prompt + body), graded as the reference grades
    problems = list(HumanEval(args.data_root, stop=args.problems))
    print(f"{len(problems)} problems, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")

    startups = []
    for _ in range(10):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-B", "-c", "pass"], check=True)
        startups.append(time.perf_counter() - start)
    print(f"floor: bare interpreter start-up {statistics.median(startups) * 1000:.0f} ms (median of 10)")

    for workers in args.workers:
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda c: run_program(humaneval_program(c, c["messages"][1]["content"])), problems))
        seconds = time.perf_counter() - start
        passed = sum(r.success for r in results)
        latency = statistics.median(r.duration for r in results) * 1000
        print(f"workers {workers}: {len(problems) / seconds:6.1f} executions/s  "
              f"median latency {latency:5.0f} ms  passed {passed}/{len(problems)}  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
