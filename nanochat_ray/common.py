"""Small helpers shared by every stage: the artifact root, atomic writes and JSON files, rank-0
printing, device choice. Imported by every job (e.g. python jobs/speedrun.py).
"""

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanochat_ray.gpus import kind_of_device


def base_dir() -> Path:
    """The one artifact root: tokenizer, shards, checkpoints, eval bundle, report.

    Set NANOCHAT_BASE_DIR to move it (on a cluster: a shared file system).
    """
    root = Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat-ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_tokenizer_dir(root: str | Path | None = None) -> Path:
    """<root>/tokenizer, where jobs/tokenizer.py saves the tokenizer and every later stage reads it."""
    return (Path(root) if root else base_dir()) / "tokenizer"


def eval_results_path(stage: str, model_tag: str, root: str | Path | None = None) -> Path:
    """<root>/evals/base_<tag>.json (jobs/base_eval.py) or chat_<stage>_<tag>.json (jobs/chat_eval.py):
    what the evaluation jobs write and the speedrun and the report read."""
    name = f"base_{model_tag}" if stage == "base" else f"chat_{stage}_{model_tag}"
    return (Path(root) if root else base_dir()) / "evals" / f"{name}.json"


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], Any]) -> None:
    """Write `path` via a synced temp file beside it and a rename: readers, a re-submitted run or
    a crash never see half a file. `data` is the content, or a function that writes the temp path
    it is given (e.g. torch.save). The temp name is unique, so two writers of one file never mix,
    and a write that fails leaves no temp file behind. (Callers that need the rename itself
    durable sync the directory.)"""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(Path(tmp))  # writes by path (tokenizers, torch.save); f stays untouched
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, default: Any = ...) -> Any:
    """The parsed file; `default` when it is missing (no default: the error names the file)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        if default is ...:
            raise
        return default


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fsync_path(path: Path) -> None:
    """Sync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed; (0, 1) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so loops need no `if rank == 0` branches."""
    if rank_world()[0] == 0:
        print(*args, **kwargs, flush=True)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 autocast on CUDA and plain fp32 on CPU (CPU bf16 matmuls are slow)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for the forward pass; a no-op in fp32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def maybe_compile(model: torch.nn.Module, setting: str, device: torch.device,
                  dynamic: bool = False) -> torch.nn.Module:
    """torch.compile on CUDA by default ('auto'); 'on' / 'off' force it either way (--compile on
    runs the GPU path's compiled step on CPU). `dynamic`: one graph for every sequence length, for
    batches whose length changes step to step; otherwise shapes are fixed and guards static."""
    if setting == "on" or (setting == "auto" and device.type == "cuda"):
        return torch.compile(model, dynamic=dynamic)
    return model


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul: the best this device does on dense math."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU denominator: on CUDA in bf16 the vendor's dense bf16 peak of this GPU kind (nanochat_ray/gpus.py;
    the reference divides by the H100's 989 TFLOP/s on every GPU); measured where the table has no figure
    (CPUs, fp32, a GPU it does not know)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        kind = kind_of_device(torch.cuda.get_device_name(device))
        if kind is not None:
            return kind.bf16_flops
        print0(f"MFU: {torch.cuda.get_device_name(device)} is not in nanochat_ray/gpus.py; measuring its matmul peak")
    return matmul_peak(device, dtype)


def init_ray() -> None:
    """Join the running cluster (the one `ray job submit` runs us on, or `ray start`), else start
    a local Ray. Workers get the same artifact root as this driver.
    """
    import ray  # only the Ray edges call this; the core never imports ray

    if ray.is_initialized():  # called from the speedrun or a test
        return
    # Under `ray job submit` the job's runtime_env already carries the environment, and Ray
    # refuses a second setting of the same variable.
    under_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job manager
    ray.init(runtime_env=None if under_job else {"env_vars": {"NANOCHAT_BASE_DIR": str(base_dir())}})


def dashboard_gauges(stage: str, names: tuple[str, ...]) -> dict:
    """Custom metrics for the Ray dashboard, nanochat_<stage>_<name> (Prometheus names: letters,
    digits, underscores). Only the Ray edges call this, as init_ray."""
    from ray.util.metrics import Gauge

    return {name: Gauge(f"nanochat_{stage}_{name}", description=f"{stage} training {name}", tag_keys=("model",))
            for name in names}
