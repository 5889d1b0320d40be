"""
Bits per byte (SPEC §5): a loss that does not depend on the tokenizer's vocabulary.

    bpb = Σ cross-entropy (nats) / (ln 2 · Σ UTF-8 bytes of the target tokens)

Special tokens (0 bytes in the token_bytes table) and masked targets (-1) count neither
loss nor bytes. Sums are all-reduced when torch.distributed is initialised, so every rank
passes its own share of the batches and gets the global figure back.
"""

import contextlib
import math
from typing import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 token_bytes: torch.Tensor, autocast_ctx=None) -> float:
    nats, nbytes, device = None, None, None
    for inputs, targets in batches:
        device = inputs.device
        if nats is None:
            nats = torch.zeros((), dtype=torch.float64, device=device)
            nbytes = torch.zeros((), dtype=torch.int64, device=device)
            token_bytes = token_bytes.to(device)
        with autocast_ctx or contextlib.nullcontext():
            loss = model(inputs, targets=targets, loss_reduction="none")  # (B, T) nats
        targets = targets.reshape(-1)
        counted = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)  # (B*T,) bytes
        nats += (loss.reshape(-1).double() * (counted > 0)).sum()
        nbytes += counted.sum()
    if nats is None:
        raise ValueError("evaluate_bpb got no batches")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    if nbytes.item() == 0:
        raise ValueError("the evaluation batches hold no byte-bearing target tokens")
    return nats.item() / (math.log(2) * nbytes.item())
