"""
GPU kinds the plan and the MFU figures know: memory, dense bf16 peak, memory bandwidth.

    kind = gpu_kind("h100-80gb")                       # by name (jobs/plan.py --gpu)
    kind = kind_of_device("NVIDIA H100 80GB HBM3")     # torch.cuda.get_device_name() or a Ray accelerator type

Peaks are the vendors' dense (no sparsity) bf16 tensor-core figures with fp32 accumulation;
memory is what the device reports (nvidia-smi's total), in GiB.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUKind:
    name: str  # the key used on command lines
    label: str
    memory_gib: float  # total device memory as the driver reports it
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    bandwidth: float  # memory bandwidth, bytes/s (decode is bound by it, not by FLOPs)
    matches: tuple[str, ...]  # lower-case substrings of torch.cuda.get_device_name() / Ray accelerator types


GPU_KINDS: dict[str, GPUKind] = {k.name: k for k in (
    GPUKind("h100-80gb", "H100 SXM 80GB", 79.2, 989e12, 3.35e12, ("h100 80gb hbm3", "h100 sxm", "h100")),
    GPUKind("h100-pcie", "H100 PCIe 80GB", 79.2, 756e12, 2.0e12, ("h100 pcie",)),
    GPUKind("h200", "H200 141GB", 139.8, 989e12, 4.8e12, ("h200",)),
    GPUKind("a100-80gb", "A100 80GB", 79.2, 312e12, 2.0e12, ("a100-sxm4-80gb", "a100 80gb", "a100-pcie-80gb",
                                                              "a100-80g")),
    GPUKind("a100-40gb", "A100 40GB", 39.4, 312e12, 1.56e12, ("a100-sxm4-40gb", "a100-pcie-40gb", "a100-40g", "a100")),
    GPUKind("l40s", "L40S 48GB", 44.4, 362e12, 0.864e12, ("l40s",)),
    GPUKind("l4", "L4 24GB", 22.0, 121e12, 0.3e12, ("l4",)),
    GPUKind("a10g", "A10G 24GB", 22.0, 70e12, 0.6e12, ("a10g",)),
    GPUKind("rtx-4090", "RTX 4090 24GB", 23.6, 165e12, 1.0e12, ("4090",)),
)}


def gpu_kind(name: str) -> GPUKind:
    """A kind by its command-line name; an error listing the known ones otherwise."""
    if name not in GPU_KINDS:
        raise ValueError(f"unknown GPU kind {name!r}; known kinds: {', '.join(GPU_KINDS)}")
    return GPU_KINDS[name]


def kind_of_device(device_name: str) -> GPUKind | None:
    """The kind whose pattern the device's name contains (the most specific pattern wins), or None."""
    lowered = device_name.lower()
    hits = [(len(pattern), kind) for kind in GPU_KINDS.values() for pattern in kind.matches if pattern in lowered]
    return max(hits, key=lambda hit: hit[0])[1] if hits else None
