"""jobs/sweep.py: Ray Tune over real pretraining runs (smoke preset), ASHA stopping the laggards."""

import importlib.util
from pathlib import Path

import pytest

from nanochat_ray.config import ConfigError, make_config
from nanochat_ray.train.sweep import parse_grid

spec = importlib.util.spec_from_file_location("sweep_job", Path(__file__).resolve().parents[1] / "jobs" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

STEPS, EVERY, GRACE = 8, 2, 2  # ASHA rungs at steps 2 and 4; a trial that passes both reaches 8


def test_grid_flags_are_typed_and_checked():
    cfg = make_config("smoke")
    assert parse_grid(["matrix_lr=0.01,0.02", "depth=2,4"], cfg) == {"matrix_lr": [0.01, 0.02], "depth": [2, 4]}
    assert parse_grid([], cfg) == {"matrix_lr": [cfg.matrix_lr * f for f in (0.25, 1, 4)],
                                         "embedding_lr": [cfg.embedding_lr * f for f in (0.25, 1)]}
    with pytest.raises(ConfigError, match="FIELD=V1,V2"):
        parse_grid(["matrix_learning_rate=0.01"], cfg)
    with pytest.raises(ConfigError, match="depth takes int"):
        parse_grid(["depth=2.5"], cfg)


def test_a_grace_period_past_the_horizon_fails_before_any_work():
    with pytest.raises(ConfigError, match="grace period 8 steps leaves no rung before the horizon \\(8 steps\\)"):
        sweep.main(["--preset", "smoke", "--grace-period", "8"])


def test_sweep_runs_trials_and_asha_stops_the_laggards(ray_cluster, data_root, smoke_tokenizer_dir, capsys):
    # Tune's grid varies the alphabetically first field fastest: trials 0 and 1 (sane LRs) start
    # first and set each rung's bar; trials 2 and 3 (an unembedding LR 100× too small: the zero-
    # initialised head hardly moves, so neither does the loss) reach the rungs later, fall below it.
    before = set(ray_cluster.util.placement_group_table())
    result = sweep.main([
        "--preset", "smoke", "--num-iterations", str(STEPS), "--eval-every", str(EVERY), "--save-every", "-1",
        "--grid", "matrix_lr=0.02,0.04", "--grid", "unembedding_lr=0.004,0.00004",
        "--grace-period", str(GRACE), "--max-concurrent-trials", "2", "--name", "test",
        "--tokenizer-dir", str(smoke_tokenizer_dir), "--data-root", str(data_root), "--num-shards", "2"])
    trials = result["trials"]
    assert len(trials) == 4 and [t["error"] for t in trials] == [None] * 4
    stopped = [t for t in trials if t["stopped_early"]]
    finished = [t for t in trials if not t["stopped_early"]]
    laggards = [t for t in trials if t["unembedding_lr"] == 0.00004]
    assert all(t["stopped_early"] for t in laggards) and finished, trials  # one sane trial may be stopped too
    for t in stopped:  # ASHA stops a trial at a rung, on the val bpb it reported there
        assert t["step"] in (GRACE, 2 * GRACE) and t["val_bpb"] > 0, t
    for t in finished:
        assert t["step"] == t["horizon"] == STEPS, t
    assert result["best"] == min(finished, key=lambda t: t["val_bpb"])
    # a stopped trial's Ray Train run is aborted, not just orphaned: nothing stays reserved
    left = {pg: t for pg, t in ray_cluster.util.placement_group_table().items() if pg not in before}
    assert all(t["state"] == "REMOVED" for t in left.values()), left
    out = capsys.readouterr().out
    assert "stopped early" in out and f"best: matrix_lr={result['best']['matrix_lr']}" in out
