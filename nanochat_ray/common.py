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
