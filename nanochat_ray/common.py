"""Small helpers shared by every stage: the artifact root, rank-0 printing, device choice."""

import os
from pathlib import Path

import torch


def base_dir() -> Path:
    """The one artifact root: tokenizer, shards, checkpoints, eval bundle, report.

    Set NANOCHAT_BASE_DIR to move it (on a cluster: a shared file system).
    """
    root = Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat-ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so loops need no `if rank == 0` branches."""
    if rank() == 0:
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


def maybe_compile(model: torch.nn.Module, setting: str, device: torch.device) -> torch.nn.Module:
    """torch.compile on CUDA by default ('auto'); 'on' / 'off' force it either way."""
    if setting == "on" or (setting == "auto" and device.type == "cuda"):
        # shapes are fixed during training, so no dynamic-shape guards are needed
        return torch.compile(model, dynamic=False)
    return model
