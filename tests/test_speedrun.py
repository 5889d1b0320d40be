"""The speedrun as Ray jobs (smoke preset): submitted to a `ray start` head through the job SDK,
killed mid-pretraining and resumed, every stage's artifacts and the report, a re-submission that
skips everything, and a deleted stage record that re-runs that stage and what reads it.

The submissions are ordered so that the work is done about once: kill → resume and finish →
skip all → re-run the tail.
"""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat_ray.checkpoint import checkpoint_dir, latest_step, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TAG = "d2"  # the smoke preset's model
PRETRAIN_STEPS = 24
STAGES = ["tokenizer", "pretrain", "base_eval", "midtrain", "mid_eval", "sft", "sft_eval"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

spec = importlib.util.spec_from_file_location("speedrun", ROOT / "jobs" / "speedrun.py")
speedrun = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speedrun)


# -----------------------------------------------------------------------------
# the driver's decisions, with stand-in jobs (no Ray): what runs, what is skipped, resumed or moved aside


@pytest.fixture
def fake_jobs(monkeypatch, tmp_path):
    """Every stage job replaced by one that records its command line and returns plausible results."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    calls = []

    def run_job(stage, argv):
        calls.append((stage.name, argv))
        if stage.checkpoint:
            return {"metrics": {"val_bpb": 1.5}}
        outputs = {"tokenizer": ["tokenizer/tokenizer.json"], "base_eval": [f"evals/base_{TAG}.json", f"evals/core_{TAG}.csv"]}
        for name in outputs.get(stage.job, [f"evals/chat_{stage.evaluates}_{TAG}.json"]):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("{}")
        return {"tokenizer": {"compression": {"val": 4.5}}, "base_eval": {"core": 0.1}}.get(stage.job, {"chatcore": 0.2})

    monkeypatch.setattr(speedrun, "run_job", run_job)

    def run(*argv: str, cpus: int = 2) -> list[str]:
        calls.clear()
        runner = speedrun.Speedrun(speedrun.parse_args(["--preset", "smoke", "--data-root", "/data", *argv]), cpus)
        runner.run()
        return sorted((name for name, _ in calls), key=STAGES.index)

    return run, calls, tmp_path


def test_done_stages_are_skipped_and_a_change_reruns_what_reads_it(fake_jobs):
    run, calls, tmp_path = fake_jobs
    assert run() == STAGES
    assert run() == []
    # base_eval's flags changed: it runs again; nothing reads its output, so nothing else does
    assert run("--stage-args", "base_eval=--max-per-task 3") == ["base_eval"]
    # an output gone missing: its stage runs again (and what reads it)
    (tmp_path / "evals" / f"chat_mid_{TAG}.json").unlink()
    assert run("--stage-args", "base_eval=--max-per-task 3") == ["mid_eval"]
    # midtraining changed: it and everything downstream of it (not pretraining, not base_eval)
    assert run("--stage-args", "base_eval=--max-per-task 3", "--stage-args", "midtrain=--num-iterations 3") == \
        ["midtrain", "mid_eval", "sft", "sft_eval"]
    # a config override reaches every stage, so all of them run again
    assert run("--seed", "7") == STAGES
    assert all(["--seed", "7"] == argv[argv.index("--seed"):argv.index("--seed") + 2] for _, argv in calls)


def test_from_only_force(fake_jobs):
    run, _, _ = fake_jobs
    run()
    assert run("--from", "sft") == ["sft", "sft_eval"]
    assert run("--only", "base_eval") == ["base_eval"]
    assert run("--force") == STAGES
    assert run("--only", "report") == []


def test_only_needs_its_inputs(fake_jobs):
    run, _, _ = fake_jobs
    with pytest.raises(speedrun.ConfigError, match="needs a finished pretrain"):
        run("--only", "midtrain")


def test_resources_are_not_part_of_the_fingerprint(fake_jobs):
    run, calls, _ = fake_jobs
    run(cpus=2)
    assert run(cpus=16) == []
    run("--force", cpus=2)
    argv = dict(calls)
    assert argv["pretrain"][-2:] == ["--cpus-per-worker", "2.0"]  # alone: every CPU
    assert argv["midtrain"][-2:] == ["--cpus-per-worker", "1.0"]  # base_eval runs beside it
    assert argv["base_eval"][-2:] == ["--num-actors", "1"]
    assert argv["sft_eval"][-2:] == ["--num-actors", "2"]  # the last stage: alone


def test_interrupted_training_resumes_and_a_changed_one_starts_fresh(fake_jobs):
    run, calls, root = fake_jobs
    run()
    # midtraining was interrupted after a checkpoint: no record, a started marker with its fingerprint
    records = root / "speedrun"
    (records / "midtrain.json").unlink()
    save_checkpoint(checkpoint_dir("mid", TAG, root), 2, {}, None, {"metrics": {}})
    runner = speedrun.Speedrun(speedrun.parse_args(["--preset", "smoke", "--data-root", "/data"]), 2)
    started = {"fingerprint": speedrun.fingerprint(runner.inputs(speedrun.BY_NAME["midtrain"]))}
    (records / "midtrain.started.json").write_text(json.dumps(started))
    assert run() == ["midtrain", "mid_eval", "sft", "sft_eval"]
    assert dict(calls)["midtrain"][-1] == "--resume"
    assert not (records / "midtrain.started.json").exists()
    # the same leftover under another config is moved aside, never resumed into
    (records / "midtrain.started.json").write_text(json.dumps(started))
    assert run("--stage-args", "midtrain=--num-iterations 3")[0] == "midtrain"
    assert dict(calls)["midtrain"][-1] == "--fresh"


def test_rl_needs_the_flag_and_the_job(fake_jobs, monkeypatch):
    run, _, _ = fake_jobs
    with pytest.raises(SystemExit):
        speedrun.parse_args(["--only", "rl"])
    monkeypatch.setattr(speedrun, "REPO", Path("/nonexistent"))
    with pytest.raises(SystemExit):
        speedrun.parse_args(["--rl"])


# -----------------------------------------------------------------------------
# the real thing: Ray jobs on a `ray start` head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    found.append(int(entry))
            except ProcessLookupError:
                pass
    return found


@pytest.fixture
def job_client(tmp_path_factory):
    """A throwaway `ray start --head` with a dashboard (the job server) on its own temp dir and ports.

    It runs in its own process group, which its daemons and workers inherit, so the test stops
    exactly this cluster by killing that group (`ray stop` would stop every Ray on the machine).
    Token auth is off: the cluster lives for one test, on ports nobody else was told about.
    """
    from ray.job_submission import JobSubmissionClient

    temp_dir = Path(f"/tmp/ray_speedrun_{os.getpid()}")
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                            "object-manager-port", "dashboard-agent-grpc-port",
                                            "dashboard-agent-listen-port", "metrics-export-port",
                                            "runtime-env-agent-port")}
    while True:  # a 200-port range somewhere in 30000-50200 that holds none of the ports above
        worker_ports = free_port() % 20000 + 30000
        if not any(worker_ports <= port <= worker_ports + 200 for port in ports.values()):
            break
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", "2",
               "--temp-dir", str(temp_dir), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--disable-usage-stats", "--min-worker-port", str(worker_ports),
               "--max-worker-port", str(worker_ports + 200),
               *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))]]
    log = tmp_path_factory.mktemp("ray_head") / "head.log"
    head = subprocess.Popen(command, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = JobSubmissionClient(address)
                break
            except Exception:  # the dashboard is not up yet
                if head.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ray start --head did not come up: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield client, address
    finally:
        for pid in processes_in_group(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_speedrun_jobs_resume_skip_and_rerun(job_client, data_root, tmp_path):
    client, address = job_client
    base = tmp_path / "artifacts"
    records = base / "speedrun"
    runtime_env = {"working_dir": str(ROOT),
                   "env_vars": {"NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA": str(Path(data_root).resolve()),
                                # Ray Train's placement-group cleaner must ask this cluster's State API
                                "RAY_API_SERVER_ADDRESS": address}}
    entrypoint = (f"{sys.executable} jobs/speedrun.py --preset smoke --hourly-price 3.5 "
                  f"--stage-args 'pretrain=--num-iterations {PRETRAIN_STEPS} --save-every 2'")

    def submit() -> str:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    def finish(job: str) -> str:
        while (status := client.get_job_status(job)) not in TERMINAL:
            time.sleep(0.5)
        logs = client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-4000:]
        return logs

    def run_ids() -> dict:
        return {name: json.loads((records / f"{name}.json").read_text())["run_id"] for name in STAGES}

    # 1. killed mid-pretraining, once a checkpoint exists and before the last step
    job = submit()
    pretrain_dir = checkpoint_dir("base", TAG, base)
    while (step := latest_step(pretrain_dir) if (pretrain_dir / "LATEST").exists() else None) is None:
        assert client.get_job_status(job) not in TERMINAL, client.get_job_logs(job)[-4000:]
        time.sleep(0.2)
    client.stop_job(job)
    while client.get_job_status(job) not in TERMINAL:
        time.sleep(0.2)
    killed_at = latest_step(pretrain_dir)
    assert killed_at < PRETRAIN_STEPS, "the kill came after the last step: nothing left to resume"
    assert (records / "tokenizer.json").exists() and not (records / "pretrain.json").exists()

    # 2. submitted again: pretraining resumes from its checkpoint, then every stage runs
    logs = finish(submit())
    assert "tokenizer  done before" in logs
    assert f"resumed from" in logs and "pretrain   resumed and done" in logs
    # quiet output: each step once (Ray Train's print patch doubled it), no per-step report dump
    step_lines = [line for line in logs.splitlines() if re.search(r"step \d{5}/\d+ \| loss", line)]
    assert len(step_lines) == len(set(step_lines)) == PRETRAIN_STEPS - killed_at + 2 * 8, step_lines
    assert "Reporting training result" not in logs and "constructor arguments in the object store" not in logs
    steps = [json.loads(line)["step"] for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1, "pretraining restarted from step 1 instead of resuming"
    assert max(steps) == PRETRAIN_STEPS and steps[-1] == PRETRAIN_STEPS
    for stage in ("base", "mid", "sft"):
        assert latest_step(checkpoint_dir(stage, TAG, base)) is not None
    for name in ("tokenizer/tokenizer.json", f"evals/base_{TAG}.json", f"evals/core_{TAG}.csv",
                 f"evals/chat_mid_{TAG}.json", f"evals/chat_sft_{TAG}.json", "report/training.png",
                 "report/summary.png"):
        assert (base / name).stat().st_size > 0, name
    report = (base / "report.md").read_text()
    for section in ("- date:", "- git commit:", "- hardware", "- Ray cluster: CPU 2", "- cost estimate: $",
                    "## Code statistics", "## Stages", *[f"### {s}" for s in STAGES], "## Summary",
                    "| CORE |", "| ChatCORE |", "Total wall clock time:"):
        assert section in report, section
    first = run_ids()

    # 3. submitted again: every stage is done, nothing runs
    logs = finish(submit())
    assert all(f"{name:<10} done before" in logs for name in STAGES), logs[-3000:]
    assert "starting:" not in logs
    assert run_ids() == first

    # 4. one stage's record deleted: that stage and the stage that reads it run again, nothing else
    (records / "sft.json").unlink()
    logs = finish(submit())
    again = run_ids()
    rerun = [name for name in STAGES if again[name] != first[name]]
    assert rerun == ["sft", "sft_eval"], rerun
    assert "moved the previous run aside" in logs  # a finished run is never resumed into
