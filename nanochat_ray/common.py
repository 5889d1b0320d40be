"""Small helpers shared by every stage: the artifact root, atomic writes and JSON files, rank-0
printing, device choice. Imported by every job (e.g. python jobs/speedrun.py).
"""

import argparse
import functools
import json
import logging
import os
import platform
import re
import subprocess
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


@functools.cache
def native_bf16() -> tuple[str, ...]:
    """This CPU's features that multiply bf16 in hardware (x86 avx512_bf16 / amx_bf16, Arm bf16);
    empty where bf16 matmuls are emulated and slower than fp32."""
    if platform.system() == "Darwin":
        found = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return ("bf16",) if found.stdout.strip() == "1" else ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    lines = re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.M)  # x86 | Arm
    flags = set(lines[0].split()) if lines else set()
    return tuple(f for f in ("avx512_bf16", "amx_bf16", "bf16") if f in flags)


def cpu_description() -> str:
    """The CPU's model name (benchmarks print it so a figure can be placed against others)."""
    try:
        names = re.findall(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 autocast on CUDA and on CPUs that multiply bf16 natively (2-3× their fp32
    matmul rate), plain fp32 on other CPUs (where bf16 is emulated and slower)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16() else torch.float32
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
    # a generator of its own: the probe runs on a thread beside training, whose random stream it must not move
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
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


# -----------------------------------------------------------------------------
# output: quiet by default, everything with --verbose

VERBOSE_ENV = "NANOCHAT_VERBOSE"  # "1": every job shows Ray's own logs too (set by --verbose)
# Ray lines that ask nothing of a user, dropped from the driver's output unless --verbose: its own
# actors (Ray Train's preemption watcher, Ray Data's map workers) keeping constructor arguments in
# the object store; Ray Data announcing each pipeline's start, plan and end, and that it shows no bars
RAY_NOISE = ("has constructor arguments in the object store and max_restarts|Starting execution of Dataset"
             r"|Execution plan of Dataset|Dataset \S+ execution finished in|Progress bars disabled\. To enable")


# The environment of the processes that train (Ray Train's workers, RL's learner), set when Ray
# starts them: torch reads it at its first allocation. THP_MEM_ALLOC_ENABLE: CPU tensors of 2 MB
# and more are backed by transparent huge pages (where the kernel allows them on request). A CPU
# training step frees and reallocates such tensors every step (gradients, the embedding's dense
# backward), and glibc maps every block over 32 MB afresh, so with 4 KiB pages each costs a page
# fault per page on first touch: ~37,000 a d4 step, ~8% of its CPU time; with 2 MB pages ~600.
TRAINING_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_output_env() -> dict[str, str]:
    """Environment for Ray's processes. Quiet: Ray Train leaves print() alone (its patch also logs every
    line, so each step printed twice) and the driver drops RAY_NOISE; verbose: Ray's defaults."""
    if verbose():
        return {VERBOSE_ENV: "1"}
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DEDUP_LOGS_SKIP_REGEX": RAY_NOISE}


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """--verbose: keep Ray's own logs (resource requests, worker-group start-up, every
    `ray.train.report`, Ray Data's execution plans). Set as the flag is parsed, so it holds for
    everything the job starts (a speedrun's stages included) and reaches the local Ray's workers."""

    class Verbose(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            os.environ[VERBOSE_ENV] = "1"
            setattr(namespace, self.dest, True)

    parser.add_argument("--verbose", action=Verbose, nargs=0, default=False,
                        help="show Ray's own logs too (default: one line per step, stage and evaluation task, "
                             "plus warnings and errors)")


def init_ray() -> None:
    """Join the running cluster (the one `ray job submit` runs us on, or `ray start`), else start
    a local Ray. Workers get the same artifact root as this driver, and the output settings
    (quiet unless --verbose, see ray_output_env).
    """
    # before Ray is imported: it reads the log filter then; Ray Train hands the print switch on
    # from this driver to its controller and workers, also under `ray job submit`
    for name, value in ray_output_env().items():
        os.environ.setdefault(name, value)
    import ray  # only the Ray edges call this; the core never imports ray

    if ray.is_initialized():  # called from the speedrun or a test
        return
    # Under `ray job submit` the job's runtime_env already carries the environment, and Ray
    # refuses a second setting of the same variable.
    under_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job manager
    env = {"NANOCHAT_BASE_DIR": str(base_dir()), **ray_output_env()}
    context = ray.init(runtime_env=None if under_job else {"env_vars": env},
                       logging_level=logging.INFO if verbose() else logging.WARNING)
    if not verbose() and not under_job and context.dashboard_url:
        print(f"started a local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs), dashboard "
              f"http://{context.dashboard_url}", flush=True)


def dashboard_gauges(stage: str, names: tuple[str, ...]) -> dict:
    """Custom metrics for the Ray dashboard, nanochat_<stage>_<name> (Prometheus names: letters,
    digits, underscores). Only the Ray edges call this, as init_ray."""
    from ray.util.metrics import Gauge

    return {name: Gauge(f"nanochat_{stage}_{name}", description=f"{stage} training {name}", tag_keys=("model",))
            for name in names}
