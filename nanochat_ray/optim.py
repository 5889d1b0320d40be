"""
The two optimizers of the speedrun (SPEC §4): Muon for the matrices inside the blocks, AdamW for
the embedding and the lm_head. Both are distributed-aware and sync gradients themselves, so the
model is not wrapped in DDP:

- DistMuon: the gradients are averaged onto the rank that owns each matrix (round-robin). That
  rank runs momentum + Newton–Schulz and broadcasts the new weights.
- DistAdamW: each rank owns a row slice (dim 0) of every parameter and keeps Adam state only for
  that slice (ZeRO-2 style). Gradient slices are averaged onto their owner, which updates the slice
  and broadcasts it.

Per-matrix `reduce` to the owner plus `broadcast` from it moves about as much data as the
reference's reduce-scatter + all-gather. Gloo and NCCL have both supported these two collectives
for a long time, which is not true of reduce-scatter on gloo. Uneven row slices need no padding.
In one process (or world size 1) all of this turns into plain Muon / AdamW updates.

Gradient clipping must see the norm of the *averaged* gradient, or 1 worker and N workers would
clip differently. step_optimizers() splits the step in three: every optimizer starts reducing
its gradients onto their owners, the owners sum the squares of what they own (one scalar
all-reduce gives the global norm), then every optimizer applies its clipped update.

A step uses up the gradients: on a non-owning rank, gloo's reduce may leave partial sums in
p.grad. Optimizer state is per rank, so a checkpoint saves one optimizer file per rank and must
be resumed with the same world size.

    optimizers = build_optimizers(model)
    grad_norm = step_optimizers(optimizers, max_grad_norm=1.0)
"""

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from nanochat_ray.common import rank_world
from nanochat_ray.gpt import GPT


def _row_shards(rows: int, world: int) -> list[tuple[int, int]]:
    """[lo, hi) rows owned by each rank; ceil split, so trailing shards may be short or empty."""
    size = -(-rows // world)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


# -----------------------------------------------------------------------------
# Muon


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U·Vᵀ of the matrix g = U·S·Vᵀ with a quintic Newton–Schulz iteration (in bf16 by default).

    The coefficients favour pushing small singular values up fast over exact convergence, so
    the result has singular values roughly in [0.7, 1.2] instead of exactly 1. That is enough
    for an update direction.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        # iterate on the wide side, so the Gram matrix x·xᵀ is the small one; contiguous, as the
        # CPU's matmuls on a transposed view ran ~25% slower
        x = x.mT.contiguous()
    # the Frobenius norm bounds the spectral norm, so every singular value starts ≤ 1;
    # the epsilon keeps an all-zero gradient at zero instead of producing NaN
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        # x ← a·x + (b·gram + c·gram²)·x, the scalings fused into the matmuls (one rounding each)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class ShardedOptimizer(torch.optim.Optimizer):
    """Owner-computes optimizer: each piece of each parameter has one owning rank, which receives
    the averaged gradient, updates the piece and broadcasts it. Subclasses say how parameters
    split into pieces and how one piece is updated."""

    # torch wraps Optimizer.add_param_group in torch._disable_dynamo, whose first call imports
    # torch._dynamo (a CPU second, in the worker on the way to step 1). Our optimizers run eagerly
    # (only the model is compiled), so they take the function it wraps.
    add_param_group = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__",
                              torch.optim.Optimizer.add_param_group)

    def _pieces(self, p: torch.Tensor, index: int, world: int) -> list[tuple[slice, int]]:
        """(row slice, owner) for each piece of parameter number `index`."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, piece: torch.Tensor, grad: torch.Tensor, group: dict,
                grad_scale: float | torch.Tensor) -> None:
        """Update `piece` (rows of p) from its averaged gradient times grad_scale."""
        raise NotImplementedError

    def _plan(self) -> list[tuple[torch.Tensor, slice, int, dict]]:
        rank, world = rank_world()
        plan = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            plan += [(p, rows, owner, group) for i, p in enumerate(params)
                     for rows, owner in self._pieces(p, i, world)]
        return plan

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Start summing every gradient piece onto its owner (asynchronously)."""
        rank, world = rank_world()
        self._pending = [(p, rows, owner, group,
                          dist.reduce(p.grad[rows], dst=owner, async_op=True) if world > 1 else None)
                         for p, rows, owner, group in self._plan()]

    @torch.no_grad()
    def owned_grad_sq(self) -> torch.Tensor:
        """Wait for this rank's pieces, average them; return the sum of their squares."""
        rank, world = rank_world()
        total = torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        for p, rows, owner, group, work in self._pending:
            if owner == rank:
                if work is not None:
                    work.wait()
                    p.grad[rows] /= world
                # one pass, no squared copy: this runs over every AdamW row (2 × vocab × width)
                total += torch.linalg.vector_norm(p.grad[rows], dtype=torch.float32).square()
        return total

    @torch.no_grad()
    def apply(self, grad_scale: float | torch.Tensor = 1.0) -> None:
        """Update the owned pieces with grad · grad_scale, then share every piece from its owner."""
        rank, world = rank_world()
        works = []
        for p, rows, owner, group, _ in self._pending:
            if owner == rank:
                self._update(p, p[rows], p.grad[rows], group, grad_scale)
            if world > 1:
                works.append(dist.broadcast(p[rows], src=owner, async_op=True))
        for work in works:
            work.wait()
        self._pending = []

    @torch.no_grad()
    def step(self) -> None:
        self.reduce_grads()
        self.owned_grad_sq()  # waits for and averages this rank's pieces
        self.apply()


def step_optimizers(optimizers: list[ShardedOptimizer], max_grad_norm: float = 0.0) -> float | None:
    """One step of every optimizer, clipping by the global norm of the averaged gradient when
    max_grad_norm > 0; returns that norm (None without clipping). Same result on 1 or N ranks."""
    for opt in optimizers:
        opt.reduce_grads()  # all reductions in flight before anyone waits
    squares = sum(opt.owned_grad_sq() for opt in optimizers)
    if max_grad_norm <= 0:
        for opt in optimizers:
            opt.apply()
        return None
    if rank_world()[1] > 1:
        dist.all_reduce(squares)  # each rank owns a disjoint share: the sum is the global norm²
    norm = squares.sqrt()
    scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # stays on the device: no sync here
    for opt in optimizers:
        opt.apply(scale)
    return norm.item()


class DistMuon(ShardedOptimizer):
    """SGD-momentum (Nesterov), then orthogonalise the update, for 2-D weight matrices.
    Whole matrices are owned round-robin."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16):
        # ns_dtype: bf16 as in the reference; fp32 makes 1 vs N processes comparable to fp32
        # rounding (tests), since bf16 turns tiny gradient-averaging differences into whole ulps
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))
        assert all(p.ndim == 2 for group in self.param_groups for p in group["params"]), \
            "Muon is for 2-D matrices only"

    def _pieces(self, p, index, world):
        return [(slice(None), index % world)]

    def _update(self, p: torch.Tensor, piece: torch.Tensor, grad: torch.Tensor, group: dict,
                grad_scale: float | torch.Tensor) -> None:
        grad = grad * grad_scale
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        momentum = group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        g = grad.lerp(buf, momentum) if group["nesterov"] else buf
        g = orthogonalize(g, group["ns_steps"], group["ns_dtype"])
        # measured RMS-in to RMS-out, an orthogonal tall matrix shrinks by sqrt(cols/rows);
        # undo that so tall matrices move their outputs as much as square and wide ones
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        piece.add_(g.to(p.dtype), alpha=-group["lr"] * scale)


def muon_momentum(step: int, warmup: int = 300) -> float:
    """Muon momentum: linear warm-up from 0.85 to 0.95 over the first `warmup` steps, then 0.95
    (warmup 0: 0.95 from the start, as the reference's SFT and RL)."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * 0.85 + frac * 0.95


def set_muon_momentum(muon: DistMuon, step: int, warmup: int = 300) -> None:
    """Apply muon_momentum(step, warmup) to every group of the Muon optimizer; call before step()."""
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step, warmup)


# -----------------------------------------------------------------------------
# AdamW


class DistAdamW(ShardedOptimizer):
    """AdamW with decoupled weight decay; each rank owns a row slice of every parameter and keeps
    Adam state for that slice only (ZeRO-2)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.8, 0.95),
                 eps: float = 1e-10, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _pieces(self, p, index, world):
        return [(slice(lo, hi), r) for r, (lo, hi) in enumerate(_row_shards(p.size(0), world)) if hi > lo]

    def _update(self, p: torch.Tensor, piece: torch.Tensor, grad: torch.Tensor, group: dict,
                grad_scale: float | torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        # the fused update wants the step count as an fp32 tensor on the parameter's device (a
        # no-op once it is one; a loaded checkpoint may hold an int or a tensor on the CPU)
        state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=grad.device)
        beta1, beta2 = group["betas"]
        # torch's fused AdamW: the same update (decoupled decay, bias-corrected moments, eps added
        # to the corrected root) in one pass over the rows instead of ~8 (12× faster on a 2-core
        # CPU over the 2 × 65,536 × 256 rows of a d4 model). It divides the gradient by grad_scale.
        unscale = None if isinstance(grad_scale, float) and grad_scale == 1.0 else \
            (1 / torch.as_tensor(grad_scale, dtype=torch.float32, device=grad.device))
        adamw([piece], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]], fused=True,
              grad_scale=unscale, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


# -----------------------------------------------------------------------------


def build_optimizers(model: GPT, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                     matrix_lr: float = 0.02, weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    """[AdamW for embedding + lm_head, Muon for the block matrices], with SPEC §4 settings.

    Every group records `initial_lr`, so a schedule sets group["lr"] = group["initial_lr"] * mult.
    """
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    grouped = [id(p) for p in matrix_params + embedding_params + lm_head_params]
    all_params = [id(p) for p in model.parameters()]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(all_params), \
        "every parameter must land in exactly one optimizer group"

    # the AdamW LRs were tuned at width 768; scale them as 1/sqrt(width) for other widths
    dim_scale = (model.config.n_embd / 768) ** -0.5
    adamw = DistAdamW([dict(params=lm_head_params, lr=unembedding_lr * dim_scale),
                       dict(params=embedding_params, lr=embedding_lr * dim_scale)],
                      betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
