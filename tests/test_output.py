"""What a user sees: Ray's chatter only with --verbose, errors always, one line per job's end (one
line per training step: tests/test_loop.py)."""

import argparse
import re

from nanochat_ray.common import RAY_NOISE, VERBOSE_ENV, add_verbose_flag, ray_output_env, verbose
from nanochat_ray.train.cli import done_line

# lines a speedrun printed before the output was quieted (Ray 2.60), with what each must become
RAY_LINES = {
    "(TrainController pid=5711) [2026-12-06 23:08:15,152 E 5711 6320] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'edbb' has constructor arguments in the object store and max_restarts > 0.": False,
    "(BatchFeeder pid=5708) Starting execution of Dataset dataset_035AE_0. Full logs are in /tmp/ray": False,
    "(BatchFeeder pid=5708) Execution plan of Dataset dataset_035AE_0: InputDataBuffer[Input] -> ActorPool": False,
    "(BatchFeeder pid=5708) ✔️  Dataset dataset_035AE_0 execution finished in 20.87 seconds": False,
    "(BatchFeeder pid=5708) Progress bars disabled. To enable, set `ray.data.DataContext...`": False,
    "(RayTrainWorker pid=7346) step 00004/8 | loss 6.5854 | lrm 1.00 | 886 ms | 289 tok/s | eta 0.5 min": True,
    "(RayTrainWorker pid=7346) ray.exceptions.RayTaskError: Dataset execution failed": True,
    "(EvalActor pid=9) Traceback (most recent call last):": True,
}


def test_quiet_by_default_and_verbose_restores_ray_defaults(monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored after the test: --verbose below sets it to 1
    assert not verbose()
    quiet = ray_output_env()
    # Ray Train's print patch also logs each print(): every step line came out twice
    assert quiet["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    kept = {line: re.search(quiet["RAY_DEDUP_LOGS_SKIP_REGEX"], line) is None for line in RAY_LINES}
    assert kept == RAY_LINES
    assert quiet["RAY_DEDUP_LOGS_SKIP_REGEX"] == RAY_NOISE

    parser = argparse.ArgumentParser()
    add_verbose_flag(parser)
    assert parser.parse_args([]).verbose is False and not verbose()
    assert parser.parse_args(["--verbose"]).verbose is True
    assert verbose() and ray_output_env() == {VERBOSE_ENV: "1"}  # Ray's own defaults, and workers see it


def test_a_training_job_ends_with_one_line():
    line = done_line({"metrics": {"step": 50, "loss": 3.2, "loss_ema": 3.45671, "val_bpb": 2.45321, "mfu": 0.4},
                      "checkpoint": "/ck/base/d4/step_000050"})
    assert line == "done: step 50, val_bpb 2.4532, loss_ema 3.4567; checkpoint /ck/base/d4/step_000050"
