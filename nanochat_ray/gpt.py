"""
The GPT model of the nanochat speedrun (SPEC §3, seed "GPT Code" diagram). Plain PyTorch.

Notable features:
- rotary position embeddings (base 10,000), no learned positions
- QK-norm: RMSNorm on queries and keys after rotary
- RMSNorm without learnable parameters, everywhere
- grouped-query attention (n_kv_head divides n_head)
- ReLU² MLP, no biases anywhere
- untied embedding and lm_head; logits soft-capped at 15·tanh(x/15)
- the lm_head, soft-cap and cross-entropy run in chunks of HEAD_CHUNK_ROWS rows, forward and
  backward, so the (B·T, vocab) logits never exist whole (65,536 columns × 65,536 rows of a d20
  micro-batch would be 16 GiB of fp32)
- a KV-cache forward path for the inference engine, with a length per row so unrelated
  requests decode in one batch

Build with build_gpt(config, device): the model on its device, then init_weights().
"""

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SOFTCAP = 15.0  # logits are squashed to (-15, 15) by SOFTCAP·tanh(logits / SOFTCAP)
LOG2_E = math.log2(math.e)
# Rows of (B·T) per chunk of the head + loss. 4,096 rows × 65,536 vocab is 1 GiB of fp32 logits
# (and as much for their gradient) at d20, ~1.5% of an 80 GB GPU, while each chunk's lm_head
# matmul (4,096 × 1,280 × 65,536: 0.7 TFLOP, three of them fwd+bwd) still dwarfs a kernel launch.
# On CPU, chunks of 256 to 1,024 rows ran alike, and faster than the plain path (README, Benchmarks).
# Memory of the head + loss at its peak (the backward): one chunk's fp32 logits, their fp32 gradient
# and a bf16 copy of it under autocast, i.e. 2.5 × HEAD_CHUNK_ROWS × vocab × 4 bytes, plus an fp32
# weight-gradient accumulator the size of lm_head; the forward peaks at 2 × (logits + log-sum-exp's
# temporary). Saved between them: the hidden states and one fp32 log-sum-exp per row.
HEAD_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048  # longest context the rotary table covers
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when < n_head)
    n_embd: int = 1280

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def norm(x: torch.Tensor) -> torch.Tensor:
    # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); rotate the two halves of the head dimension as pairs
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


# -----------------------------------------------------------------------------


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls with t run in here: autocast's when it is on for t's device, else t's own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def kv_cache_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """What a KV cache stores: the compute dtype on GPU (half the cache of fp32 under bf16), fp32 on
    CPU, where torch's fp32 attention beats its bf16 one at decode sizes (README, "The inference engine")."""
    return torch.float32 if device.type == "cpu" else compute_dtype


class KVCache:
    """Keys and values for every layer, (layers, 2, B, H_kv, T_max, D), with a length per row.

    Rows may hold sequences of different lengths (the engine decodes unrelated requests
    together): each row writes at its own position `pos[row]`, takes rotary angles from it,
    and attends only to its own keys through a mask. A forward on a batch of B tokens uses
    rows [0, B). The positions advance only after the last layer has written, so all layers
    of one forward see the same offsets. T_max grows on demand.
    """

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, n_layer: int, seq_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        # zeros, not empty: keys past a row's length are masked out of the scores, but their
        # values still meet a zero weight, and 0 * NaN would poison the row
        self.kv = torch.zeros((n_layer, 2, batch_size, n_kv_head, seq_len, head_dim), device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.mask: torch.Tensor | None = None  # (B, 1, T, L) for the forward in progress
        self._positions: torch.Tensor | None = None  # (B, T) where that forward's tokens go
        self._rows: torch.Tensor | None = None  # (B, 1) row indices, and the cache's
        self._window: torch.Tensor | None = None  # rows and positions that forward reads

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    def begin(self, batch: int, T: int) -> torch.Tensor:
        """Start a forward of T new tokens on rows [0, batch); returns their positions (batch, T)."""
        self._positions = self.pos[:batch, None] + torch.arange(T, device=self.pos.device)
        length = int(self._positions[:, -1].max()) + 1  # the longest row after this forward
        self._ensure(length)
        keys = torch.arange(length, device=self.pos.device)
        # a query sees the keys at or before its own position in its own row: causal within
        # the chunk, and blind to the stale tail of rows shorter than the longest
        self.mask = (keys <= self._positions[..., None])[:, None]
        # what every layer indexes, made once per forward (a decode step is mostly small ops)
        self._rows = torch.arange(batch, device=self.pos.device)[:, None]
        self._window = self.kv[:, :, :batch, :, :length]  # (layers, 2, batch, H_kv, length, D)
        return self._positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        """Write k, v (B, H_kv, T, D) at each row's position, then attend with q (B, H, T, D) over each
        row's keys under the mask from begin(); returns (B, H, T, D) in q's dtype.

        The attention runs in the cache's dtype whatever autocast says: an fp32 cache (the engine's
        on CPU) is there because torch's CPU attention is faster in fp32 than in bf16 at decode sizes."""
        # indices around a slice put their dims first: the target is (B, T, 2, H_kv, D); index_put
        # does not convert dtypes
        self.kv[layer][:, self._rows, :, self._positions] = torch.stack((k, v)).permute(1, 3, 0, 2, 4).to(self.kv.dtype)
        if layer == self.kv.size(0) - 1:
            self.pos[:k.size(0)] = self._positions[:, -1] + 1
        keys, values = self._window[layer]
        with torch.autocast(q.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=self.mask, enable_gqa=enable_gqa)
        return y.to(q.dtype)

    def prefill_from(self, other: "KVCache", rows: list[int] | None = None) -> None:
        """Copy a batch-1 cache into `rows` of this one (every row by default)."""
        assert other.batch_size == 1, "can only broadcast a batch-1 cache"
        rows = list(range(self.batch_size)) if rows is None else rows
        length = int(other.pos[0])
        self._ensure(length)
        self.kv[:, :, rows, :, :length] = other.kv[:, :, :1, :, :length]
        self.pos[rows] = length

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (the engine keeps its live rows packed at the front)."""
        length = int(self.pos[src])
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]
        self.pos[dst] = length

    def _ensure(self, needed: int) -> None:
        if needed <= self.kv.shape[4]:
            return
        # grow in chunks of 1024 so decoding long answers does not reallocate every step
        new_len = (needed + 1023) // 1024 * 1024
        grown = self.kv.new_zeros((*self.kv.shape[:4], new_len, self.kv.shape[5]))
        grown[:, :, :, :, :self.kv.shape[4]] = self.kv
        self.kv = grown


# -----------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        gqa = self.n_head != self.n_kv_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # the cache's mask is causal per row and hides keys past each row's length
            y = kv_cache.attend(self.layer_idx, q, k, v, gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.n_kv_head == 0, "n_kv_head must divide n_head"
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary table for 10x the context, so the engine can decode past sequence_len
        self.rotary_len = config.sequence_len * 10
        cos, sin = self.rotary_table(self.rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotary_table(self, seq_len: int, head_dim: int, base: float = 10000.0,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        device = device or self.transformer.wte.weight.device
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        # (1, T, 1, D/2): broadcasts over batch and heads. bf16 as in the reference (fp32 q/k times
        # these promote to fp32): its logits, within fp32 reordering noise, not 5e-5 away
        return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """SPEC §3 init, over the constructors' default init (build_gpt)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        # output projections start at zero: every block begins as the identity
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # buffers are not created by to_empty() with real values; rebuild the rotary table
        self.cos, self.sin = self.rotary_table(self.rotary_len, self.config.head_dim)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """FLOPs per token for forward+backward (SPEC §3): 6·N_nonembed + attention term."""
        c = self.config
        nparams_nonembed = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * nparams_nonembed + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) → final normed hidden states (B, T, n_embd), before the lm_head.

        The engine's prefill calls this alone: it only needs the cache filled, and the lm_head
        would be most of the prefill's work.
        """
        B, T = idx.size()
        if kv_cache is None:
            assert T <= self.cos.size(1), f"sequence of {T} tokens exceeds the rotary table"
            cos_sin = self.cos[:, :T], self.sin[:, :T]
        else:
            positions = kv_cache.begin(B, T)  # (B, T): every row continues from its own length
            assert kv_cache.mask.size(-1) <= self.cos.size(1), "sequence exceeds the rotary table"
            cos_sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        return norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) → logits (B, T, vocab), or the loss when targets are given.

        Targets of -1 are ignored. loss_reduction="none" gives per-token losses (B, T) for bpb.
        The loss never builds the whole (B, T, vocab) logits (see head_loss); callers that need
        logits at a few positions only should call `logits(hidden_states(idx)[rows, positions])`.
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.logits(x)
        assert kv_cache is None, "the KV-cache path is for inference"
        loss = head_loss(x, self.lm_head.weight, targets, loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., n_embd) → soft-capped fp32 logits (..., vocab): the model's logits path
        outside the loss (the evals' chosen positions; the engine's own forward gives the same bits)."""
        return head_logits(hidden, self.lm_head.weight)


# -----------------------------------------------------------------------------
# the soft-capped head and its loss, chunked


def softcap(logits: torch.Tensor) -> torch.Tensor:
    """SOFTCAP·tanh(logits / SOFTCAP), computed as SOFTCAP·(2·sigmoid(2·logits / SOFTCAP) − 1).

    The same function (agreeing with tanh to ~1e-6 in fp32), and torch's CPU sigmoid is ~10×
    faster than its tanh. Outside autograd it overwrites `logits`: a second (rows, vocab) buffer
    is what chunking the head saves.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.sigmoid(logits * (2 / SOFTCAP)) * (2 * SOFTCAP) - SOFTCAP
    return logits.mul_(2 / SOFTCAP).sigmoid_().mul_(2 * SOFTCAP).sub_(SOFTCAP)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., C) hidden states, (V, C) lm_head weight → soft-capped fp32 logits (..., V): the matmul
    in the inputs' (or autocast's) dtype, the soft-cap in fp32 for a stable softmax."""
    return softcap((hidden @ weight.t()).float())


# Under torch.compile the loss is a pair of custom ops rather than a plain autograd.Function: the
# compiler would trace a Function's forward and backward into one graph, merge the backward's
# recomputed logits with the forward's (common-subexpression elimination) and save every chunk's
# logits for the backward, which is the whole (B·T, vocab) tensor again. An op's inside is opaque to
# the compiler, so the compiled step saves what setup_context saves and no more. (Inside, the chunks
# run eagerly.) Eager mode runs the same functions as an autograd.Function (_EagerHeadLoss).
#
# Two ways to the gradient. A mean or sum loss (training) scales every row's loss alike, so its
# forward computes the gradients for a unit scale while each chunk's logits are at hand and saves
# those (the size of the hidden states and of lm_head); its backward only scales them. This skips the
# backward's recomputation of the logits: a quarter of the head's matmuls and half its passes over
# (rows, vocab). Per-row losses ("none": bpb, RL's advantage-weighted loss) get any weight per row, so
# their forward saves one log-sum-exp per row and the backward recomputes each chunk's logits.


# Scratch (rows, V) buffers of the head + loss, kept between calls on CPU, per thread. A fresh
# 1,024 × 65,536 fp32 tensor is 65,536 page faults there (glibc hands blocks over 32 MB straight back
# to the OS), which cost more than the exps written into it: reusing four such buffers took ~40% off
# the CPU time of a d4 step. On GPUs the caching allocator already reuses memory.
_scratch = threading.local()


def _buffer(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) scratch tensor (contents undefined) that only the caller uses until it returns."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.size(0) < rows or buf.size(1) != cols:
        buf = buffers[(name, dtype)] = torch.empty(rows, cols, dtype=dtype)
    return buf[:rows]


def release_scratch() -> None:
    """Free this thread's scratch buffers of the head (they are kept between calls on CPU)."""
    _scratch.__dict__.pop("buffers", None)


def _in_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The lm_head in the compute dtype, copied into a scratch buffer when that is another dtype."""
    if weight.dtype == dtype:
        return weight
    return _buffer("weight_cast", *weight.shape, dtype, weight.device).copy_(weight)


# Inside the ops every pass over (rows, V) counts (each ~15-80 ms on one core at d4), so the logits
# there are soft-capped, shifted up by SOFTCAP (the shift cancels in the softmax and the loss) and in
# base 2: c = (softcap(z) + SOFTCAP)·log2(e) = CAP·sigmoid(2z/SOFTCAP), in (0, CAP), no pass for the
# shift. Base 2 because torch's CPU exp2 is ~3× faster than its exp (26 vs 82 ms over 1,024 × 65,536
# on one core), for a relative error of ~1e-6 from rounding the scaled argument. The log-sum-exp
# the ops return is of these shifted logits (what the backward needs of it).
CAP = 2 * SOFTCAP * LOG2_E
# d softcap(z)/dz = 4·s·(1 − s) for s = sigmoid(2z/SOFTCAP), = SLOPE·c·(1 − c/CAP) in terms of c
SLOPE = 4 / CAP


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, V) logits c = CAP·sigmoid(2·(h @ weight.T) / SOFTCAP) in fp32, in a scratch buffer."""
    rows, cols = h.size(0), weight.size(0)
    capped = _buffer("logits", rows, cols, torch.float32, h.device)
    if h.dtype == torch.float32:
        torch.mm(h, weight.t(), out=capped)
    else:
        capped.copy_(torch.mm(h, weight.t(), out=_buffer("low", rows, cols, h.dtype, h.device)))
    return capped.mul_(2 / SOFTCAP).sigmoid_().mul_(CAP)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One chunk of rows: (logits c, 2^c, log-sum-exp, losses, 0 where t < 0), the first two in
    scratch buffers."""
    capped = _chunk_logits(h, weight)
    # each 2^c is below 2^CAP = e^(2·SOFTCAP) ≈ 1e13, so their sum cannot overflow: no pass for the row maximum
    exp = torch.exp2(capped, out=_buffer("exp", *capped.shape, torch.float32, h.device))
    lse = exp.sum(dim=-1).log_()
    picked = capped.gather(1, t.clamp(min=0)[:, None]).squeeze(1) / LOG2_E
    return capped, exp, lse, torch.where(t >= 0, lse - picked, 0.0)


def _logits_grad(capped: torch.Tensor, probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d loss / d (h @ weight.T) of a chunk for a unit weight per row, 0 where t < 0, built in probs'
    storage, which holds softmax·SLOPE (the callers fold the constant into their normalisation);
    overwrites capped (the logits c of _chunk_logits)."""
    # d loss / d softcap(z) = softmax − one_hot(target), times SLOPE here
    probs.scatter_add_(1, t.clamp(min=0)[:, None], torch.full_like(probs[:, :1], -SLOPE))
    # times d softcap(z) / dz / SLOPE = c·(1 − c/CAP): one fused multiply-add on c, then the product
    grad = probs.mul_(capped.addcmul_(capped, capped, value=-1 / CAP))
    return grad.index_fill_(0, (t < 0).nonzero().squeeze(1), 0.0)


def _accumulate_grads(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_hidden: torch.Tensor,
                      grad_weight: torch.Tensor, first: bool) -> None:
    """A chunk's fp32 logits gradient → its rows of grad_hidden, and into the fp32 grad_weight (written
    by the first chunk, added to by the others); the matmuls in the compute dtype (h's)."""
    if grad.dtype != h.dtype:
        grad = _buffer("low", *grad.shape, h.dtype, h.device).copy_(grad)
    torch.mm(grad, weight, out=grad_hidden)
    if h.dtype == torch.float32:
        torch.mm(grad.t(), h, out=grad_weight) if first else grad_weight.addmm_(grad.t(), h)
        return
    low = torch.mm(grad.t(), h, out=_buffer("weight", *weight.shape, h.dtype, h.device))
    # copy_ converts as it writes; a mixed-dtype add on CPU first makes an fp32 copy of `low`
    grad_weight.copy_(low) if first else grad_weight.add_(low)


def _grad_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The fp32 accumulator of lm_head's gradient: left uninitialised when a first chunk will write it
    (zeroing a vocab × width tensor is a pass over it, and on CPU ~16,000 page faults at d4)."""
    return (torch.empty_like if rows else torch.zeros_like)(weight, dtype=torch.float32)


def _head_loss_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
               with_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of softcap(hidden @ weight.T) (0 where target < 0), each row's log-sum-exp
    of the shifted logits (see CAP), and with_grads: the gradients wrt hidden and weight of the losses'
    sum (else empty)."""
    n = hidden.size(0)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else hidden.new_empty(0)
    grad_weight = _grad_weight(weight, n) if with_grads else weight.new_empty(0)
    weight = _in_dtype(weight, hidden.dtype)  # the compute dtype (autocast's); the gradient stays fp32
    for i in range(0, n, chunk_rows):
        rows = slice(i, i + chunk_rows)
        h, t = hidden[rows], targets[rows]
        capped, exp, lse[rows], losses[rows] = _chunk_loss(h, weight, t)
        if with_grads:
            grad = _logits_grad(capped, exp.div_(exp.sum(dim=-1, keepdim=True) / SLOPE), t)
            _accumulate_grads(grad, h, weight, grad_hidden[rows], grad_weight, i == 0)  # summed in fp32
    return losses, lse, grad_hidden, grad_weight


def _head_loss_recompute(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        lse: torch.Tensor, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt hidden and weight for any weight per row, recomputing each chunk's logits and
    turning them into that chunk's gradient in place: one (rows, V) logits buffer and one gradient
    buffer at a time."""
    grad_hidden = torch.empty_like(hidden)
    grad_weight = _grad_weight(weight, hidden.size(0))  # summed over chunks in fp32
    weight_dtype, weight = weight.dtype, _in_dtype(weight, hidden.dtype)
    for i in range(0, hidden.size(0), chunk_rows):
        rows = slice(i, i + chunk_rows)
        h, t = hidden[rows], targets[rows]
        capped = _chunk_logits(h, weight)  # (rows, V)
        # softmax·SLOPE = 2^(c − lse·log2(e) + log2(SLOPE))
        shift = lse[rows, None] * LOG2_E - math.log2(SLOPE)
        probs = torch.sub(capped, shift, out=_buffer("exp", *capped.shape, torch.float32, h.device)).exp2_()
        grad = _logits_grad(capped, probs, t).mul_(grad_losses[rows, None])
        _accumulate_grads(grad, h, weight, grad_hidden[rows], grad_weight, i == 0)
    return grad_hidden, grad_weight.to(weight_dtype)


_head_loss = torch.library.custom_op("nanochat::head_loss", _head_loss_forward, mutates_args=())
_head_loss_backward = torch.library.custom_op("nanochat::head_loss_backward", _head_loss_recompute, mutates_args=())


@_head_loss.register_fake
def _(hidden, weight, targets, chunk_rows, with_grads):
    n = hidden.size(0)
    grads = ((torch.empty_like(hidden), torch.empty_like(weight, dtype=torch.float32)) if with_grads
             else (hidden.new_empty(0), weight.new_empty(0)))
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32), *grads


@_head_loss_backward.register_fake
def _(grad_losses, hidden, weight, targets, lse, chunk_rows):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, chunk_rows, with_grads = inputs
    ctx.with_grads, ctx.chunk_rows, ctx.weight_dtype = with_grads, chunk_rows, weight.dtype
    # the backward ignores the gradients of every output but the losses: left as None, not
    # materialised as zeros (a vocab × width tensor for grad_weight's)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*(output[2:] if with_grads else (hidden, weight, targets, output[1])))


def _backward(ctx, grad_losses: torch.Tensor, _grad_lse, _grad_hidden, _grad_weight):
    if ctx.with_grads:
        # head_loss asks for the gradients only for a sum or mean of the losses, whose gradient is
        # the same for every row: the one scale of the forward's gradients
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_losses[0]
        # in place: nothing else holds these, and a fresh vocab × width copy is 16,000 page faults on CPU
        return grad_hidden.mul_(scale), grad_weight.mul_(scale).to(ctx.weight_dtype), None, None, None
    hidden, weight, targets, lse = ctx.saved_tensors
    recompute = _head_loss_backward if torch.compiler.is_compiling() else _head_loss_recompute
    grad_hidden, grad_weight = recompute(grad_losses.contiguous(), hidden, weight, targets, lse, ctx.chunk_rows)
    return grad_hidden, grad_weight, None, None, None


_head_loss.register_autograd(_backward, setup_context=_setup_context)


class _EagerHeadLoss(torch.autograd.Function):
    """The head loss outside torch.compile: the ops' own functions, without torch.library's dispatch,
    which wraps every kernel in torch._disable_dynamo and so imports torch._dynamo at the first call
    (a CPU second, in a worker on the way to step 1)."""
    forward = staticmethod(_head_loss_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
              chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy of the soft-capped head: F.cross_entropy(softcap(hidden @ weight.T), targets,
    ignore_index=-1, reduction=...) in value and gradient, chunk_rows rows of logits at a time.

    hidden (..., C), targets (...); reduction "none" gives losses shaped like targets (0 where
    ignored), "sum" their sum, "mean" the sum over the counted targets. Under autocast the
    matmuls run in its dtype, as nn.Linear's would; the weight is cast inside the op, so its gradient,
    summed in fp32, reaches an fp32 weight without a round trip through bf16.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    hidden = hidden.to(matmul_dtype(hidden))  # autocast's dtype, as nn.Linear would compute in
    # the forward computes the gradients when they will be needed and every row weighs the same
    with_grads = reduction != "none" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_op = _head_loss if torch.compiler.is_compiling() else _EagerHeadLoss.apply
    losses = loss_op(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), chunk_rows, with_grads)[0]
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets >= 0).sum()


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's functions leave their tensor as it is: the constructors' default init, which
    init_weights() replaces, takes no time and draws no random numbers (the seed's init stays the one
    init_weights() draws)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_gpt(config: GPTConfig, device: torch.device | str = "cpu") -> GPT:
    """A freshly initialised GPT, built on its device."""
    # Not built on the meta device and then materialised: on meta, the rotary table's arange (and
    # the inits) run through torch._refs, whose first call imports torch._dynamo (a CPU second, in
    # the worker on the way to step 1)
    with torch.device(device), _SkipInit():
        model = GPT(config)
    model.init_weights()
    return model
