"""Config: the depth dial, presets, command-line overrides and their errors."""

import argparse

import pytest

from nanochat_ray.config import PRESETS, Config, ConfigError, add_config_args, config_from_argv, make_config, validate


def test_depth_dial_derives_the_model():
    cfg = make_config("d20")
    gpt = cfg.gpt_config()
    assert (gpt.n_embd, gpt.n_head, gpt.n_kv_head, gpt.n_layer, gpt.sequence_len) == (1280, 10, 10, 20, 2048)
    assert cfg.grad_accum_steps(world_size=8) == 1  # 32 × 2048 × 8 = 524,288
    assert cfg.grad_accum_steps(world_size=1) == 8  # same total batch on one GPU
    # Chinchilla horizon: 20 × 561M params / 524,288 tokens per step
    assert cfg.iterations(num_params=560_988_160, flops_per_token=1) == 21_400
    assert make_config("d20", num_iterations=7).iterations(10**9, 1) == 7
    assert make_config("d20", target_flops=1e18).iterations(10**9, 3_491_758_080) == int(1e18 // (3_491_758_080 * 524288))
    # before any model exists: the d20 model's own parameter count, or a fixed horizon as it is
    assert cfg.horizon() == 21_400
    assert make_config("d20", num_iterations=7).horizon() == 7


def test_every_preset_is_valid_and_cpu_matches_spec_14():
    for name in PRESETS:
        make_config(name)
    cpu = make_config("cpu")
    assert (cpu.depth, cpu.seq_len, cpu.device_batch_size, cpu.total_batch_size, cpu.num_iterations) == (4, 1024, 1, 1024, 50)
    assert (make_config("d26").model_dim, make_config("d32").model_dim) == (1664, 2048)


def test_lr_schedule_constant_then_linear_warmdown():
    cfg = make_config("smoke", warmdown_ratio=0.2)
    mults = [cfg.lr_multiplier(step, 100) for step in range(101)]
    assert mults[0] == mults[80] == 1.0
    assert mults[90] == pytest.approx(0.5) and mults[100] == 0.0
    assert all(a >= b for a, b in zip(mults, mults[1:]))
    warm = make_config("smoke", warmup_ratio=0.1, warmdown_ratio=0.0)
    assert warm.lr_multiplier(0, 100) == pytest.approx(0.1) and warm.lr_multiplier(9, 100) == 1.0


def test_command_line_overrides_every_field():
    cfg = config_from_argv(["--preset", "smoke", "--depth", "3", "--device-batch-size", "4",
                            "--total-batch-size", "512", "--matrix-lr", "0.01", "--run", "exp1"])
    assert (cfg.depth, cfg.device_batch_size, cfg.total_batch_size, cfg.matrix_lr, cfg.run) == (3, 4, 512, 0.01, "exp1")
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    flags = {a.dest for a in parser._actions}
    assert set(Config.__dataclass_fields__) <= flags


@pytest.mark.parametrize("argv, fragment", [
    (["--depth", "two"], "--depth"),
    (["--matrix-lr", "nan"], "--matrix-lr"),
    (["--not-a-field", "1"], "--not-a-field"),
    (["--preset", "huge"], "--preset"),
])
def test_command_line_errors_name_the_flag(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        config_from_argv(argv)
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("overrides, field", [
    (dict(depth=5), "n_head"),  # 320 not divisible by 3 heads
    (dict(depth=4, head_dim=64, n_kv_head=3), "n_kv_head"),
    (dict(total_batch_size=100), "total_batch_size"),
    (dict(depth=0), "depth"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(warmup_ratio=0.9, warmdown_ratio=0.5), "warmup_ratio"),
    (dict(dtype="fp8"), "dtype"),
    (dict(depth="4"), "depth"),  # wrong type
    (dict(colour=1), "colour"),  # unknown key
    (dict(matrix_lr=-0.02), "matrix_lr"),
    (dict(embedding_lr=-1.0), "embedding_lr"),
    (dict(unembedding_lr=-0.004), "unembedding_lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(depth=1000), "depth"),  # absurd: ~10^12 parameters
    (dict(eval_tokens=0), "eval_tokens"),  # less than one batch of 2 × 64 tokens
    (dict(eval_tokens=-128), "eval_tokens"),
])
def test_impossible_configs_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        make_config("smoke", **overrides)


def test_batch_must_divide_over_workers():
    cfg = make_config("smoke")  # 2 × 64 tokens per micro-step, 256 total
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="workers 4"):
        validate(cfg, world_size=4)


def test_default_preset_follows_the_ray_cluster_not_the_driver(ray_cluster, monkeypatch, capsys):
    from nanochat_ray.config import default_preset

    assert default_preset() == "cpu"  # the test cluster has no GPU
    assert "the Ray cluster has 0 GPU(s)" in capsys.readouterr().out
    # a driver on a CPU-only head, workers with 8 GPUs: the cluster decides
    monkeypatch.setattr(ray_cluster, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert default_preset() == "d20"
    assert "preset d20: no --preset given and the Ray cluster has 8 GPU(s)" in capsys.readouterr().out
