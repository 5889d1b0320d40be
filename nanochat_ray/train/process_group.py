"""
The workers' torch process group, set up by Ray Train's controller without torch in the controller.

Ray Train's own TorchConfig lives in a module that imports torch, and the controller unpickles the
backend config it is given, so the controller imported torch (~1 CPU second) before it placed the
workers: on the way to step 1, one process after the other. ProcessGroupConfig is what TorchTrainer
is given instead. Its backend does what TorchConfig's does for our workers (rank 0's address and a
free port as the env:// rendezvous, the torch.distributed env vars, init_process_group with gloo on
CPU and nccl on GPU, the group destroyed at the end), in functions that run on the workers, where
torch is imported anyway; they call Ray's own worker-side helpers, so both set up the same group.
"""

import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

SHUTDOWN_TIMEOUT_S = 30  # a worker that does not answer (it crashed) must not hold up the run's end


@dataclass
class ProcessGroupConfig(BackendConfig):
    """TorchTrainer's `torch_config`: it sets `backend` (gloo or nccl) when left None, as for TorchConfig."""
    backend: str | None = None
    timeout_s: int = 1800  # of the process group's collectives

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return CudaDeviceContext

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH


class CudaDeviceContext:
    """Around the train function on each worker: its GPU is the current CUDA device (nccl needs it)."""

    def __enter__(self):
        import torch
        from ray.train.torch import get_device

        if torch.cuda.is_available() and (device := get_device()).type == "cuda":
            torch.cuda.set_device(device)

    def __exit__(self, *exc) -> bool:
        return False


def join_process_group(backend: str, master: tuple[str, int], rank: int, world_size: int, timeout_s: int) -> None:
    """On a worker: join the group whose rendezvous is at `master` (rank 0's address and port)."""
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
    _set_torch_distributed_env_vars()  # RANK, LOCAL_RANK, WORLD_SIZE, ...
    _setup_torch_process_group(backend, rank, world_size, "env://", timeout_s)


def leave_process_group(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


class ProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True  # each worker sees every GPU of its node (nccl's P2P)

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        master = worker_group.execute_single(0, get_address_and_port)
        # (a worker that never joins fails init_process_group on the others after timeout_s)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend_config.backend, master, rank,
                                                   len(worker_group), backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        futures = worker_group.execute_async(leave_process_group, destroy=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            pass  # the workers are being torn down anyway; the group goes with their processes
