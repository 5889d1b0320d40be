"""
`ray up` / `ray down` for real on one machine: cluster-local.yaml (cluster.yaml's node types, CPU
only) brought up by Ray's own cluster launcher, the smoke speedrun submitted with `ray job submit`,
the autoscaler adding worker nodes for it and removing them when idle, then `ray down`.

    python bench/local_cluster.py                  # ~5-10 min on 2 cores
    python bench/local_cluster.py --speedrun-args "--preset smoke --num-workers 2 --no-overlap"

It prints the nodes after `ray up` (the head, no CPU), every change the autoscaler makes while the
job runs, the job's status and wall time, the scale-down, and after `ray down` the processes of the
cluster still alive on the machine (none). It exits non-zero when the job fails, no worker node was
added, the idle nodes stay past --scale-down-wait, or a process outlives `ray down`.

This module is also the cluster's node provider (`provider: type: external` in cluster-local.yaml,
imported by `ray up`, `ray down` and the autoscaler on the head, hence PYTHONPATH=<checkout>). Ray's
fake_multinode provider cannot serve here: its docs start it with `ray start --autoscaling-config`,
not `ray up`, its nodes live only in the memory of the process that made them (`ray down` cannot see
them) and Ray's wheel lacks the example.yaml that `ray up` loads for its defaults. Here a "node" is a
directory under the provider's root, used as its HOME, and the processes that carry its path in
NANOCHAT_LOCAL_NODE: every command the launcher or the autoscaler runs on the node gets it, and
Ray's daemons, workers and job drivers inherit it. Stopping a node signals exactly those processes,
so other Ray clusters on the machine are never touched (`ray stop` would stop all of them).
"""

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import yaml
from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.job_submission import JobSubmissionClient

REPO = Path(__file__).resolve().parents[1]
MARKER = "NANOCHAT_LOCAL_NODE"  # the node a process belongs to: the node's home directory
STOP_GRACE_SECONDS = 15.0


# -----------------------------------------------------------------------------
# the processes of a node


def marked_processes(under: Path) -> list[int]:
    """Live processes of the node whose home is `under`, or of every node below it (a provider root)."""
    node, below = f"{MARKER}={under}".encode(), f"{MARKER}={under}/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()  # empty for a zombie: it counts as gone
        except OSError:  # gone meanwhile, or another user's process
            continue
        if any(var == node or var.startswith(below) for var in environ.split(b"\0")):
            found.append(int(entry))
    return found


def stop_processes(under: Path) -> int:
    """SIGTERM to the processes of `under` (a node or a root), SIGKILL to those still alive after the
    grace period (a raylet stops its workers on SIGTERM). Returns how many there were."""
    pids = marked_processes(under)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + STOP_GRACE_SECONDS
    while (alive := marked_processes(under)) and time.time() < deadline:
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


# -----------------------------------------------------------------------------
# the node provider and its command runner


class LocalCommandRunner(CommandRunnerInterface):
    """Runs a node's commands on this machine in the node's home, with a fresh environment (this
    machine's venv first on PATH, the caller's PYTHONPATH made absolute) as a login to it would give."""

    def __init__(self, home: Path, process_runner: ModuleType, log_prefix: str):
        self.home, self.process_runner, self.log_prefix = home, process_runner, log_prefix

    def environment(self) -> dict[str, str]:
        pythonpath = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return {"HOME": str(self.home), MARKER: str(self.home), "PYTHONPATH": os.pathsep.join(pythonpath),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
                "LANG": os.environ.get("LANG", "C.UTF-8"), "RAY_USAGE_STATS_ENABLED": "0"}

    def run(self, cmd: str | None = None, timeout: int = 120, exit_on_fail: bool = False, port_forward=None,
            with_output: bool = False, environment_variables: dict | None = None, run_env: str = "auto",
            ssh_options_override_ssh_key: str = "", shutdown_after_run: bool = False):
        if cmd and re.fullmatch(r"\s*ray\s+stop(\s.*)?", cmd, re.S):
            # `ray down` sends `ray stop` to the head: stop this node, not every Ray on the machine
            count = stop_processes(self.home)
            print(f"{self.log_prefix}`{cmd.strip()}`: stopped the {count} processes of node {self.home.name}")
            return b""
        if cmd and re.search(r"\bray\s+stop\b", cmd):
            raise ValueError(f"{self.log_prefix}refusing {cmd!r}: `ray stop` inside a longer command would stop "
                             f"every Ray on this machine; give it a line of its own in the yaml (then it stops "
                             f"this node only)")
        command = _with_environment_variables(cmd or "true", environment_variables or {})
        argv = ["bash", "-c", command]  # not a login shell: the real home's profile is not this node's
        if with_output:
            return self.process_runner.check_output(argv, env=self.environment(), cwd=self.home)
        self.process_runner.check_call(argv, env=self.environment(), cwd=self.home)
        return b""

    def node_path(self, path: str) -> Path:
        return self.home / path[2:] if path.startswith("~/") else Path(path)

    def run_rsync_up(self, source: str, target: str, options: dict | None = None) -> None:
        copy(Path(source), self.node_path(target))

    def run_rsync_down(self, source: str, target: str, options: dict | None = None) -> None:
        copy(self.node_path(source), Path(target))

    def remote_shell_command_str(self) -> str:
        return f"cd {shlex.quote(str(self.home))} && HOME={shlex.quote(str(self.home))} bash"


def copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)


class LocalNodeProvider(NodeProvider):
    """Nodes on this machine. The launcher (`ray up`, `ray down`) and the autoscaler on the head are
    different processes, so the nodes and their tags live in <root>/nodes.json, under a file lock."""

    def __init__(self, provider_config: dict, cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.root = Path(provider_config["root"])
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # the autoscaler launches and sets up nodes from several threads

    @contextmanager
    def state(self):
        """The nodes (id -> tags) and how many were ever launched, read and written back atomically."""
        path = self.root / "nodes.json"
        with self.lock, open(self.root / "nodes.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(path.read_text()) if path.exists() else {"launched": 0, "nodes": {}}
            yield state
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(state, indent=1))
            partial.replace(path)

    def home(self, node_id: str) -> Path:
        return self.root / node_id

    def non_terminated_nodes(self, tag_filters: dict) -> list[str]:
        with self.state() as state:
            return [node for node, tags in state["nodes"].items()
                    if all(tags.get(key) == value for key, value in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        with self.state() as state:
            return node_id in state["nodes"]

    def is_terminated(self, node_id: str) -> bool:
        return not self.is_running(node_id)

    def node_tags(self, node_id: str) -> dict:
        with self.state() as state:
            return dict(state["nodes"].get(node_id, {}))

    def internal_ip(self, node_id: str) -> str:
        return "127.0.0.1"

    def external_ip(self, node_id: str) -> str:
        return "127.0.0.1"

    def set_node_tags(self, node_id: str, tags: dict) -> None:
        with self.state() as state:
            state["nodes"][node_id].update(tags)

    def create_node(self, node_config: dict, tags: dict, count: int) -> None:
        with self.state() as state:
            for _ in range(count):
                state["launched"] += 1
                node = f"{tags.get(TAG_RAY_USER_NODE_TYPE, 'node')}-{state['launched']}"
                self.home(node).mkdir(parents=True, exist_ok=True)
                state["nodes"][node] = dict(tags)

    def terminate_node(self, node_id: str) -> None:
        stop_processes(self.home(node_id))
        with self.state() as state:
            state["nodes"].pop(node_id, None)

    def get_command_runner(self, log_prefix: str, node_id: str, auth_config: dict, cluster_name: str,
                           process_runner: ModuleType, use_internal_ip: bool,
                           docker_config: dict | None = None) -> CommandRunnerInterface:
        return LocalCommandRunner(self.home(node_id), process_runner, log_prefix)


# -----------------------------------------------------------------------------
# the run: ray up, ray job submit, watch the autoscaler, ray down

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "cluster-local.yaml"), help="the cluster's yaml")
    parser.add_argument("--data-root", default=os.environ.get("NANOCHAT_DATA", str(REPO.parent / "shared" / "data")),
                        help="the datasets, handed to the job as NANOCHAT_DATA")
    parser.add_argument("--speedrun-args", default="--preset smoke --num-workers 2",
                        help="flags of jobs/speedrun.py (two workers of one CPU: two nodes of cluster-local.yaml)")
    parser.add_argument("--scale-down-wait", type=float, default=240.0,
                        help="seconds to wait after the job for the autoscaler to remove the idle nodes (0: skip)")
    return parser.parse_args()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def launcher(args: list[str], log: Path, env: dict) -> tuple[int, float, str]:
    """`ray <args>` from the checkout root; its output goes to a file (the daemons `ray up` starts
    would hold a pipe open forever). Returns the exit status, seconds taken and the output."""
    start = time.time()
    with open(log, "w") as out:
        rc = subprocess.call([str(Path(sys.executable).with_name("ray")), *args], cwd=REPO, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
    return rc, time.time() - start, log.read_text()


def ray_status(gcs: str, env: dict) -> str:
    """`ray status`'s node section and resources, without its blank lines."""
    out = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address", gcs], env=env,
                         capture_output=True, text=True).stdout
    return "\n".join("    " + line for line in out.splitlines() if line.strip() and not line.startswith("-"))


def nodes(gcs: str) -> tuple[dict[str, int], int, str]:
    """The autoscaler's view: live nodes per type, nodes being launched, CPUs used/total."""
    try:
        status = get_cluster_status(gcs, timeout=10)
    except Exception as e:  # a loaded machine can delay the GCS; the next poll asks again
        return {}, 0, f"(no answer: {type(e).__name__})"
    live: dict[str, int] = {}
    for node in status.active_nodes + status.idle_nodes:
        live[node.ray_node_type_name] = live.get(node.ray_node_type_name, 0) + 1
    pending = sum(launch.count for launch in status.pending_launches) + len(status.pending_nodes)
    cpu = next((f"{u.used:g}/{u.total:g}" for u in status.cluster_resource_usage if u.resource_name == "CPU"), "0/0")
    return live, pending, cpu


def describe(live: dict[str, int], pending: int, cpu: str) -> str:
    shown = ", ".join(f"{name} ×{count}" for name, count in sorted(live.items())) or "(none)"
    return f"nodes: {shown}; launching {pending}; CPU used/total {cpu}"


def run_job(args: argparse.Namespace, config: dict, gcs: str, dashboard: str, env: dict, scratch: Path,
            failures: list[str]) -> None:
    """ray up; the speedrun through `ray job submit`, with the nodes as the autoscaler changes them;
    then the scale-down of the idle nodes. What goes wrong is appended to `failures`."""
    worker_types = set(config["available_node_types"]) - {config["head_node_type"]}
    rc, seconds, out = launcher(["up", "-y", "--no-config-cache", "--disable-usage-stats", args.config],
                                scratch / "up.log", env)
    if rc != 0:
        print(out[-4000:])
        failures.append(f"ray up failed (exit {rc})")
        return
    print(f"\n$ ray up -y {Path(args.config).name}: {seconds:.0f} s\n{ray_status(gcs, env)}")

    runtime_env = {"env_vars": {"NANOCHAT_DATA": str(Path(args.data_root).resolve()),
                                "NANOCHAT_BASE_DIR": str(scratch / "artifacts"),
                                "RAY_API_SERVER_ADDRESS": dashboard}}  # Ray Train asks this cluster's State API
    entrypoint = ["python", "jobs/speedrun.py", *shlex.split(args.speedrun_args)]
    print(f"\n$ ray job submit --address {dashboard} --working-dir . -- {shlex.join(entrypoint)}")
    submitted = time.time()
    rc, _, out = launcher(["job", "submit", "--address", dashboard, "--no-wait", "--working-dir", str(REPO),
                           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint], scratch / "submit.log", env)
    job = re.search(r"raysubmit_\w+", out)
    if rc != 0 or not job:
        print(out[-4000:])
        failures.append("ray job submit failed")
        return
    client = JobSubmissionClient(dashboard)
    last, peak, peak_status = None, 0, ""
    while (status := str(client.get_job_status(job[0]).value)) not in TERMINAL:
        live, pending, cpu = nodes(gcs)
        if (live, pending) != last:
            print(f"  {time.time() - submitted:6.1f} s  {describe(live, pending, cpu)}")
            last = (live, pending)
        workers = sum(count for name, count in live.items() if name in worker_types)
        if workers > peak:
            peak, peak_status = workers, ray_status(gcs, env)
        time.sleep(2)
    wall = time.time() - submitted
    print(f"\njob {job[0]}: {status} after {wall:.0f} s (submit to end); `ray status` with the most worker "
          f"nodes ({peak}):\n{peak_status}")
    lines = client.get_job_logs(job[0]).splitlines()
    print("\n  last lines of the job's log:\n" + "\n".join("    " + line for line in lines[-16:]))
    if status != "SUCCEEDED":
        failures.append(f"the job ended {status}")
    if peak == 0:
        failures.append("the autoscaler added no worker node")

    if args.scale_down_wait > 0:
        print(f"\nidle nodes go after idle_timeout_minutes={config['idle_timeout_minutes']}:")
        ended = time.time()
        while time.time() - ended < args.scale_down_wait:
            live, pending, cpu = nodes(gcs)
            if (live, pending) != last:
                print(f"  {time.time() - ended:6.1f} s after the job  {describe(live, pending, cpu)}")
                last = (live, pending)
            if live and not set(live) & worker_types and not pending:
                return
            time.sleep(2)
        failures.append(f"idle worker nodes still up {args.scale_down_wait:.0f} s after the job")


def take_down(args: argparse.Namespace, root: Path, gcs: str, env: dict, scratch: Path, failures: list[str]) -> None:
    """ray down, then what is left of the cluster on the machine: its processes (killed if any) and files."""
    rc, seconds, out = launcher(["down", "-y", args.config], scratch / "down.log", env)
    stops = re.findall(r"`ray stop`: (stopped the \d+ processes of node \S+)", out)
    print(f"\n$ ray down -y {Path(args.config).name}: exit {rc}, {seconds:.0f} s; {'; '.join(stops)}")
    if rc != 0:
        print(out[-3000:])
        failures.append(f"ray down failed (exit {rc})")
    left = marked_processes(root)
    print(f"processes of the cluster still running: {len(left)}; "
          f"{gcs} {'still answers' if port_in_use(int(gcs.rsplit(':', 1)[1])) else 'closed'}")
    if left:
        failures.append(f"{len(left)} processes outlived ray down (now killed)")
        stop_processes(root)
    shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    from nanochat_ray.common import cpu_description  # here, not above: the autoscaler need not import torch

    args = parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    root = Path(config["provider"]["root"])
    head_command = " ".join(config["head_start_ray_commands"])
    gcs_port, dashboard_port = (re.search(rf"--{flag}=(\d+)", head_command)[1] for flag in ("port", "dashboard-port"))
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    busy = [address for address in (gcs, dashboard) if port_in_use(int(address.rsplit(":", 1)[1]))]
    if busy or marked_processes(root):
        sys.exit(f"{', '.join(busy) or root} already in use: a cluster of {args.config} is up (take it down "
                 f"with `PYTHONPATH={REPO} ray down -y {args.config}`), or another program holds its ports")
    print(f"CPU: {cpu_description()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"cluster: {args.config}, node types {', '.join(config['available_node_types'])}; root {root}")

    scratch = Path(tempfile.mkdtemp(prefix="nanochat-local-cluster-"))  # artifacts and the launcher's logs
    # TMPDIR: the launcher's config cache and bootstrap files go where the run's end removes them
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_UP_enable_autoscaler_v2": "1", "TMPDIR": str(scratch)}
    failures: list[str] = []
    try:
        run_job(args, config, gcs, dashboard, env, scratch, failures)
    finally:
        take_down(args, root, gcs, env, scratch, failures)
        shutil.rmtree(scratch, ignore_errors=True)
    print("FAILED: " + "; ".join(failures) if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
