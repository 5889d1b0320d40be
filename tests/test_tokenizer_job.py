"""jobs/tokenizer.py end to end on the data mirror, and its argument checks."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from tokenizers import Tokenizer as HFTokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str):
    """jobs/ is a folder of scripts, not a package: import one by path."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = load_job("tokenizer")


def test_tokenizer_job_on_the_mirror(ray_cluster, data_root, tmp_path):
    output = tmp_path / "tokenizer"
    result = job.main(["--preset", "smoke", "--data-root", str(data_root), "--output", str(output)])

    assert result["tokenizer_dir"] == str(output)
    assert (output / "tokenizer.json").is_file() and (output / "token_bytes.pt").is_file()
    assert result["vocab_size"] == 1024
    assert HFTokenizer.from_file(str(output / "tokenizer.json")).get_vocab_size() == 1024
    assert result["train_chars"] == 2_000_000  # the smoke preset's tokenizer_max_chars
    assert result["val_shard"].endswith("shard_00004.parquet")
    assert len(result["train_shards"]) == 2 and result["val_shard"] not in result["train_shards"]
    ratios = result["compression"]
    assert set(ratios) == {"train", "val", "news", "korean", "code", "math", "science"}
    assert 2 < ratios["val"] < 6
    assert ratios["korean"] >= 1  # never worse than one byte per token


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "10"], "vocab_size"),
    (["--num-shards", "1"], "--num-shards"),
    (["--num-shards", "5000"], "--num-shards"),
])
def test_bad_arguments_fail_before_ray(flags, message, monkeypatch, capsys):
    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was touched before the arguments were checked")

    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(ray, "is_initialized", tripwire)
    with pytest.raises(SystemExit) as info:
        job.main(["--preset", "smoke", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_runs_as_a_script():
    # `python jobs/tokenizer.py` (how `ray job submit` runs it), stopped at the argument check
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "tokenizer.py"), "--preset", "smoke",
                          "--vocab-size", "10"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "vocab_size must be at least 265" in run.stderr
