"""
The plan before a run: per-stage, per-rank peak memory, FLOPs per token, time and cost, from the
config alone (an analytic model; no GPU needed), so a stage that cannot fit is found before paying.

    python jobs/plan.py --preset d20 --gpus 8 --gpu h100-80gb --hourly-price 24
    python jobs/plan.py --preset d32 --gpus 8 --gpu h100-80gb --as-reference   # the reference's own step

Memory = parameters + gradients + optimizer state + saved activations + the largest transient
(the logits, a layer's backward temporaries, a KV cache), per rank. How each term is counted:
- parameters and gradients: every parameter's dtype (ours: fp32 everywhere; the reference stores
  the embedding in bf16 on GPU, SPEC §3); gradients exist during a micro-step only when gradient
  accumulation carried some over (with one micro-step they appear as backward frees activations).
- optimizer state: the owner's share, as optim.py shards it (AdamW rows, Muon whole matrices
  round-robin), or as the reference shards it (AdamW rows, Muon round-robin within shape groups).
- saved activations: bytes per token, layer and model_dim, counted from what autograd keeps for
  each op of gpt.py's Block (ACTIVATION_BYTES below), for the three ways a step runs.
- the lm_head: the reference keeps the whole (B·T, vocab) logits and their gradient; ours runs
  gpt.py's chunked custom ops, modelled op by op (head_transient): a chunk's fp32 logits and
  logsumexp's temporary in forward, its logits, fp32 gradient and compute-dtype copy in backward,
  plus an fp32 lm_head weight-gradient accumulator; between them only the hidden states.
- the RL learner: eager bf16, one process (the whole optimizer state, gradients kept across its
  forwards); each forward packs one rollout call's sequences (prompt + new tokens) up to a training
  micro-step's token budget, the head at sampled positions only (rl/actors.py, rl/policy.py).
Validated two ways (tests/test_plan.py): (a) against the measured peak RSS of the same step on CPU;
(b) the reference's step against what its authors saw on 80 GB H100s.
"""

import math
import re
from dataclasses import dataclass

from nanochat_ray import gpt
from nanochat_ray.config import Config
from nanochat_ray.gpus import GPUKind

GiB = 2**30

# --- the device ---------------------------------------------------------------------------
# Memory a process cannot use for tensors: the CUDA context (~0.5 GiB on an H100 with lazy module
# loading), NCCL buffers, cuBLAS workspaces, the caching allocator's rounding. An assumption bounded
# by the reference's own run (no GPU was available when this was written): its d20 at device batch
# 32 fits an 80 GB H100 (its authors ran it) while a later version needing ~2 GiB more at the same
# batch ran out (karpathy/nanochat issue #443), so at that shape all of this is under ~1 GiB.
CUDA_OVERHEAD_GIB = 0.5
# On an OOM the caching allocator frees its cache and retries, so what must fit is what tensors hold
# plus this fraction for blocks it cannot reuse; nvidia-smi shows more (the cache), up to the whole card.
ALLOCATOR_SLACK = 0.0

# --- saved activations, bytes per token per layer per model_dim unit -----------------------
# Counted op by op over Block.forward (n_kv_head = n_head; in units of model_dim, 4·dim for the MLP):
# eager fp32 (CPU): rms_norm inputs x, x2 (2), norm(x) (1, shared by c_q/c_k/c_v), rotated q, k
#   before QK-norm (2), normed q, k, v and the attention output kept by SDPA (4), y.contiguous() (1),
#   norm(x2) (1), relu output (4) and its square (4): 19 floats = 76 bytes.
# eager bf16 autocast (the RL learner, which is not compiled): fp32 residual x, x2 (8 bytes), three
#   bf16 casts of norm(x) (autocast caches casts of weights, not of activations: 6), q, k kept by
#   the rotary products (4), the rotated q, k (cast back to bf16) into rms_norm (4), q, k, v, out
#   kept by SDPA (8), y (2), cast of norm(x2) (2), relu and square in bf16 (16): 50 bytes.
# compiled bf16 (torch.compile fuses the casts and pointwise chains; one copy of each): ours keeps
#   the fp32 residual (x, x2: 8) + 9 bf16 dims (18) + relu and square (16) = 42; the reference's
#   residual is bf16 (its embedding is stored bf16): 38.
ACTIVATION_BYTES = {"eager-fp32": 76, "eager-bf16": 50, "compiled-ours": 42, "compiled-reference": 38}
# the reference's whole-logits head, per token and vocabulary entry (ours is chunked: head_transient):
# training, compiled bf16: inductor keeps the bf16 matmul output and writes one bf16 gradient,
#   recomputing the soft-cap chain: 4
# evaluation (no graph kept): fp32 logits, logits/15 and tanh(...) at once: 12
HEAD_TRAIN_BYTES_REFERENCE = 4
HEAD_EVAL_BYTES_REFERENCE = 12

# --- the stages' shapes (what the jobs run; see jobs/sft.py, evals/chatcore.py, rl/driver.py, serve) --
SFT_MAX_DEVICE_BATCH = 4  # jobs/sft.py: 4 conversations per micro-batch, padded to the longest (≤ seq_len)
CORE_ROWS = 4  # the most continuations of one CORE item, scored in one forward (4-way multiple choice)
CHAT_EVAL_BATCH = 8  # evals/chatcore.py: categorical prompts per forward
RL_ROWS = 128  # rollout rows decoded together at most: a pass@k eval call, 16 questions × 8 samples (rl/driver.py)
RL_QUESTIONS, RL_SAMPLES = 16, 16  # per step (SPEC §10, rl/driver.py RLOptions)
RL_MAX_NEW = 256  # SPEC §10
RL_PROMPT_TOKENS = 256  # a rendered GSM8K question is ~100-200 tokens: an upper bound
SERVE_MAX_BATCH = 32  # serve/config.yaml max_batch
# the compute dtype on a GPU (bf16 autocast): the KV cache is kept in it (engine.DecodeBatch), the
# chunked head's matmuls and gradient copy run in it; CPU runs (validation, rehearsal) pass 4
GPU_DTYPE_BYTES = 2
KV_GROW = 1024  # the KV cache grows in chunks of this many positions

# --- time ------------------------------------------------------------------------------------
# Token counts the config does not give, stated as assumptions (measured on the cpu runs' data):
MID_TOKENS = 350e6  # one epoch of the ~850K-conversation midtraining mixture, packed
SFT_TOKENS_PADDED = 30e6  # ~23K conversations padded to each micro-batch's longest
CORE_TOKENS = 60e6  # every CORE item's rows (~90K items × ~4 rows × ~170 tokens), forward only
CHAT_GEN_TOKENS = (1319 + 164 + 256) * 512  # GSM8K test, HumanEval, SpellingBee: up to 512 new tokens each
RL_STEPS = 7473 // 16  # one epoch of GSM8K train at 16 questions per step


@dataclass(frozen=True)
class Recipe:
    """How a side runs its GPU steps: ours (this code) or the reference (nanochat 01f5f10)."""
    name: str
    embedding_bytes: int  # 4 = fp32; the reference stores its embedding in bf16
    compiled: str  # ACTIVATION_BYTES key of the compiled training step
    head_chunk_rows: int | None  # rows of the chunked lm_head + loss; None = full logits


def recipe(reference: bool = False) -> Recipe:
    if reference:
        return Recipe("reference", 2, "compiled-reference", None)
    return Recipe("ours", 4, "compiled-ours", gpt.HEAD_CHUNK_ROWS)


@dataclass
class Memory:
    """Bytes on one rank at its peak."""
    params: float = 0
    grads: float = 0
    optimizer: float = 0
    activations: float = 0
    transient: float = 0  # the largest temporary: logits, backward temporaries, optimizer scratch
    kv_cache: float = 0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.transient + self.kv_cache


# -----------------------------------------------------------------------------
# parameters and optimizer state


def matrices(cfg: Config) -> list[tuple[int, int]]:
    """Shapes of the block matrices in model.transformer.h.parameters() order (Muon's order)."""
    d, hd = cfg.model_dim, cfg.model_dim // cfg.n_head
    q, kv = cfg.n_head * hd, cfg.kv_heads * hd
    return [shape for _ in range(cfg.depth) for shape in ((q, d), (kv, d), (kv, d), (d, d), (4 * d, d), (d, 4 * d))]


def num_params(cfg: Config) -> int:
    return 2 * cfg.vocab_size * cfg.model_dim + sum(r * c for r, c in matrices(cfg))


def flops_per_token(cfg: Config) -> int:
    """GPT.estimate_flops (SPEC §3): 6·(params − embedding) + 12·layers·heads·head_dim·seq_len."""
    hd = cfg.model_dim // cfg.n_head
    return 6 * (num_params(cfg) - cfg.vocab_size * cfg.model_dim) + 12 * cfg.depth * cfg.n_head * hd * cfg.seq_len


def param_bytes(cfg: Config, r: Recipe) -> float:
    embedding = cfg.vocab_size * cfg.model_dim
    return embedding * r.embedding_bytes + (num_params(cfg) - embedding) * 4


def optimizer_bytes(cfg: Config, r: Recipe, world: int) -> tuple[float, float]:
    """(state, scratch) on the rank that owns the most: Adam moments of its row slice of the
    embedding and lm_head, Muon momentum of its matrices; scratch = the owner's update temporaries."""
    rows = -(-cfg.vocab_size // world) * cfg.model_dim  # the largest row slice
    if r.name == "reference":
        # moments in the parameter's dtype, plus the reduce-scattered gradient slice
        adam = rows * (3 * r.embedding_bytes + 3 * 4)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for shape in matrices(cfg):
            by_shape.setdefault(shape, []).append(shape[0] * shape[1])
        muon = sum(sum(sizes[0::world]) for sizes in by_shape.values()) * 4
    else:
        adam = rows * 2 * 2 * 4  # two fp32 moments of the wte and lm_head slices
        muon = sum(r_ * c for i, (r_, c) in enumerate(matrices(cfg)) if i % world == 0) * 4
    largest = max(r_ * c for r_, c in matrices(cfg))
    # grad·scale and the Nesterov blend (fp32), Newton–Schulz in bf16: x, x·xᵀ and its square, the update
    scratch = largest * (4 + 4 + 2 * 4)
    return adam + muon, scratch


# -----------------------------------------------------------------------------
# one step's memory


def dtype_bytes(mode: str) -> int:
    return 4 if mode == "eager-fp32" else GPU_DTYPE_BYTES


def head_transient(cfg: Config, rows: int, chunk: int, nbytes: int, training: bool) -> float:
    """The largest temporary of gpt.py's chunked head + loss over `rows` rows, op by op, with its
    matmuls in a dtype of `nbytes` bytes (2 under bf16 autocast; 4 in fp32, where casts are no-ops)."""
    R, V = min(rows, chunk), cfg.vocab_size
    several = rows > chunk
    cast = 4 if nbytes != 4 else 0  # the fp32 copy of a bf16 matmul output (head_logits' .float())
    # forward (_head_loss): the logits and logsumexp's (logits − max).exp_() temporary; with several
    # chunks, the previous chunk's logits live until the next chunk's matmul and fp32 copy are made
    forward = R * V * max(8, (4 if several else 0) + nbytes + cast)
    if not training:
        return forward
    # backward (_head_loss_backward): the recomputed logits (capped) and the new fp32 gradient, while
    # the previous chunk's gradient (in the compute dtype) is still held; then capped, the fp32 gradient
    # and its copy in the compute dtype; beside them the fp32 weight-gradient accumulator and grad_hidden
    per_chunk = R * V * max(8 + (nbytes if several else 0), 8 + (nbytes if nbytes != 4 else 0))
    weight_grad = V * cfg.model_dim * 4
    # grad.t() @ h, then .float(), while the chunk's gradient in the compute dtype is held
    weight_step = R * V * nbytes + V * cfg.model_dim * (nbytes + cast)
    backward = weight_grad + rows * cfg.model_dim * nbytes + max(per_chunk, weight_step)
    return max(forward, backward)


def train_memory(cfg: Config, r: Recipe, world: int, tokens: int, mode: str, accum: int,
                 head_tokens: int | None = None) -> Memory:
    """Peak of a training micro-step over `tokens` tokens (the head over `head_tokens` of them, all by
    default): the head's forward or backward with every activation saved, or the optimizer step
    (gradients + state + scratch), whichever is larger. accum > 1: gradients held across micro-steps."""
    head_tokens = tokens if head_tokens is None else head_tokens
    nbytes = dtype_bytes(mode)
    params = param_bytes(cfg, r)
    state, scratch = optimizer_bytes(cfg, r, world)
    activations = tokens * cfg.depth * cfg.model_dim * ACTIVATION_BYTES[mode]
    activations += tokens * cfg.model_dim * 4 * 2  # the final norm's input and output
    if r.head_chunk_rows is None:
        head = head_tokens * cfg.vocab_size * HEAD_TRAIN_BYTES_REFERENCE
    else:
        if nbytes != 4:  # the op saves the hidden states and the lm_head weight cast to the compute dtype
            activations += (head_tokens + cfg.vocab_size) * cfg.model_dim * nbytes
        head = head_transient(cfg, head_tokens, r.head_chunk_rows, nbytes, training=True)
    # a block's backward: gradients of the MLP's hidden (relu, square, c_fc output) in the compute dtype
    layer = tokens * 4 * cfg.model_dim * 3 * nbytes
    backward = Memory(params, params if accum > 1 else 0, state, activations, max(head, layer))
    step = Memory(params, params, state, 0, scratch)
    return backward if backward.total >= step.total else step


def rl_learner_memory(cfg: Config, r: Recipe, batch: int) -> tuple[Memory, int]:
    """(peak, sequences per forward) of the RL learner (rl/actors.py Learner.accumulate): one
    question's samples of prompt + new tokens at a time (its loss is normalised on its own), as many
    per forward as fit batch × seq_len tokens; eager bf16; the whole optimizer state; gradients kept
    across forwards; the head at sampled positions only."""
    length = RL_PROMPT_TOKENS + RL_MAX_NEW
    sequences = max(1, min(RL_SAMPLES, batch * cfg.seq_len // length))
    memory = train_memory(cfg, r, 1, sequences * (length - 1), "eager-bf16", 2, sequences * RL_MAX_NEW)
    return memory, sequences


def eval_memory(cfg: Config, r: Recipe, rows: int, seq: int, with_optimizer_of: int | None = None,
                nbytes: int = GPU_DTYPE_BYTES) -> Memory:
    """Peak of a no-grad forward over rows × seq tokens: the weights (plus the optimizer state when
    it runs inside a training worker of that world size), one layer's temporaries, the head."""
    tokens = rows * seq
    state = optimizer_bytes(cfg, r, with_optimizer_of)[0] if with_optimizer_of else 0
    layer = tokens * cfg.model_dim * 4 * (1 + 4 + 4)  # residual, c_fc output, relu² (fp32 upper bound)
    if r.head_chunk_rows is None:
        head = tokens * cfg.vocab_size * HEAD_EVAL_BYTES_REFERENCE
    else:
        head = head_transient(cfg, tokens, r.head_chunk_rows, nbytes, training=False)
    return Memory(param_bytes(cfg, r), 0, state, 0, max(layer, head))


def decode_memory(cfg: Config, r: Recipe, rows: int, positions: int, nbytes: int = GPU_DTYPE_BYTES) -> Memory:
    """An engine decoding `rows` together with room for `positions` tokens each, its KV cache in the
    compute dtype (engine.DecodeBatch)."""
    allocated = -(-positions // KV_GROW) * KV_GROW
    hd = cfg.model_dim // cfg.n_head
    kv = cfg.depth * 2 * rows * cfg.kv_heads * allocated * hd * nbytes
    logits = rows * cfg.vocab_size * 4 * 3  # logits, probabilities, the top-k scratch
    return Memory(param_bytes(cfg, r), 0, 0, 0, logits, kv)


# -----------------------------------------------------------------------------
# the plan


@dataclass
class StageRow:
    stage: str
    shape: str  # what runs, e.g. "32 × 2048, accum 1"
    memory: Memory
    flops_per_token: float
    seconds: float  # the stage's expected time
    fits: bool = True
    largest_batch: int | None = None  # the largest device batch that fits, when this one does not


@dataclass
class Plan:
    cfg: Config
    gpu: GPUKind
    gpus: int
    recipe: Recipe
    mfu: float
    rows: list[StageRow]
    hourly_price: float | None = None

    @property
    def usable(self) -> float:
        return (self.gpu.memory_gib - CUDA_OVERHEAD_GIB) * GiB

    @property
    def seconds(self) -> float:
        return sum(row.seconds for row in self.rows)

    @property
    def misfits(self) -> list[StageRow]:
        return [row for row in self.rows if not row.fits]


def fits(memory: Memory, usable: float) -> bool:
    return memory.total * (1 + ALLOCATOR_SLACK) <= usable


def make_plan(cfg: Config, gpu: GPUKind, gpus: int, reference: bool = False, mfu: float = 0.45,
              hourly_price: float | None = None) -> Plan:
    r = recipe(reference)
    usable = (gpu.memory_gib - CUDA_OVERHEAD_GIB) * GiB
    fpt = flops_per_token(cfg)
    compute = gpus * gpu.bf16_flops * mfu  # FLOP/s of the whole node at the stated MFU
    T, B = cfg.seq_len, cfg.device_batch_size

    def largest_fitting(batch: int, memory_of) -> int:
        """The largest power-of-two device batch below `batch` whose memory_of(b) fits (0: none)."""
        return next((b for b in (2**i for i in range(int(math.log2(batch)), -1, -1)) if fits(memory_of(b), usable)), 0)

    def train_row(name: str, batch: int, tokens: float, mode: str, world: int) -> StageRow:
        def memory_of(b: int) -> Memory:
            return train_memory(cfg, r, world, b * T, mode, max(1, cfg.total_batch_size // (b * T * world)))
        memory = memory_of(batch)
        micro_accum = max(1, cfg.total_batch_size // (batch * T * world))
        row = StageRow(name, f"{batch} × {T}, accum {micro_accum}", memory, fpt, tokens * fpt / compute)
        row.fits = fits(memory, usable)
        if not row.fits:
            row.largest_batch = largest_fitting(batch, memory_of)
        return row

    def learner_row(tokens: float) -> StageRow:
        memory, sequences = rl_learner_memory(cfg, r, B)
        length = RL_PROMPT_TOKENS + RL_MAX_NEW
        row = StageRow("RL learner", f"{sequences} × {length - 1}, world 1, eager", memory, fpt,
                       tokens * fpt / (gpu.bf16_flops * mfu))  # one GPU
        row.fits = fits(memory, usable)
        if not row.fits:
            row.largest_batch = largest_fitting(B, lambda b: rl_learner_memory(cfg, r, b)[0])
        return row

    def eval_row(name: str, rows: int, seq: int, tokens: float, world: int | None) -> StageRow:
        memory = eval_memory(cfg, r, rows, seq, world)
        return StageRow(name, f"{rows} × {seq}, no grad", memory, fpt / 3, tokens * fpt / 3 / compute,
                        fits(memory, usable))

    def decode_row(name: str, rows: int, positions: int, new_tokens: float, streams: int) -> StageRow:
        memory = decode_memory(cfg, r, rows, positions)
        # each decode step reads the weights and the cache once: bandwidth-bound, for `streams` GPUs
        step = (memory.params + memory.kv_cache / 2) / gpu.bandwidth
        return StageRow(name, f"{rows} rows × {positions} positions", memory, 2 * num_params(cfg),
                        new_tokens / rows * step / streams, fits(memory, usable))

    iterations = cfg.iterations(num_params(cfg), fpt)
    pretrain_tokens = iterations * cfg.total_batch_size
    evals = (iterations // cfg.eval_every + 1) if cfg.eval_every > 0 else 0
    rows = [
        train_row("pretrain step", B, pretrain_tokens, r.compiled, gpus),
        eval_row("val bpb (in training)", B, T, evals * cfg.eval_tokens, gpus),
        eval_row("CORE", CORE_ROWS, T, CORE_TOKENS, gpus),
        train_row("midtraining", B, MID_TOKENS, r.compiled, gpus),
        train_row("SFT (longest pad)", min(SFT_MAX_DEVICE_BATCH, B), SFT_TOKENS_PADDED, r.compiled, gpus),
        eval_row("chat eval (categorical)", CHAT_EVAL_BATCH, T, 0, None),
        decode_row("chat eval (generative)", 1, T, CHAT_GEN_TOKENS, gpus),
        decode_row("RL rollouts", RL_ROWS, RL_PROMPT_TOKENS + RL_MAX_NEW, RL_STEPS * RL_QUESTIONS * RL_SAMPLES * RL_MAX_NEW,
                   max(1, gpus - 1)),
        learner_row(RL_STEPS * RL_QUESTIONS * RL_SAMPLES * (RL_PROMPT_TOKENS + RL_MAX_NEW)),
        decode_row("serving (max_batch)", SERVE_MAX_BATCH, T, 0, 1),
    ]
    return Plan(cfg, gpu, gpus, r, mfu, rows, hourly_price)


# -----------------------------------------------------------------------------
# printing


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_plan(plan: Plan) -> str:
    cfg, r = plan.cfg, plan.recipe
    head = "full fp32 logits" if r.head_chunk_rows is None else f"chunked head, {r.head_chunk_rows} rows"
    lines = [f"plan: {cfg.model_tag} ({num_params(cfg):,} params, {flops_per_token(cfg) / 1e9:.2f} GFLOP/token) on "
             f"{plan.gpus}× {plan.gpu.label} ({plan.gpu.memory_gib:.1f} GiB, {plan.gpu.bf16_flops / 1e12:.0f} TFLOP/s "
             f"bf16), {r.name} step ({head}); time at {100 * plan.mfu:.0f}% MFU",
             f"usable per rank {_gib(plan.usable)} GiB (less {CUDA_OVERHEAD_GIB} GiB for the CUDA context and NCCL)",
             "",
             f"{'stage':<24} {'shape':<36} {'params':>6} {'grads':>6} {'optim':>6} {'activ':>6} {'trans':>6} "
             f"{'kv':>6} {'peak':>6}  {'GFLOP/tok':>9} {'time':>9}  fits",
             ]
    for row in plan.rows:
        m = row.memory
        verdict = "yes" if row.fits else (f"NO: largest device batch that fits {row.largest_batch}"
                                          if row.largest_batch is not None else "NO")
        lines.append(f"{row.stage:<24} {row.shape:<36} {_gib(m.params):>6} {_gib(m.grads):>6} {_gib(m.optimizer):>6} "
                     f"{_gib(m.activations):>6} {_gib(m.transient):>6} {_gib(m.kv_cache):>6} {_gib(m.total):>6}  "
                     f"{row.flops_per_token / 1e9:>9.2f} {format_duration(row.seconds):>9}  {verdict}")
    total = f"whole run ≈ {format_duration(plan.seconds)} on {plan.gpus} GPUs"
    if plan.hourly_price:
        total += f", ≈ ${plan.seconds / 3600 * plan.hourly_price:,.0f} at ${plan.hourly_price:g}/hour"
    lines += ["", total + " (GiB per rank; compute-bound stages at the MFU, decoding bandwidth-bound)"]
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def savings(cfg: Config, gpu: GPUKind, gpus: int) -> str:
    """Ours against the reference's step, stage by stage: what our changes save (or cost)."""
    ours, ref = make_plan(cfg, gpu, gpus), make_plan(cfg, gpu, gpus, reference=True)
    lines = [f"{'stage':<24} {'ours':>7} {'reference':>9} {'saved':>7}  (GiB per rank)"]
    for a, b in zip(ours.rows, ref.rows):
        lines.append(f"{a.stage:<24} {_gib(a.memory.total):>7} {_gib(b.memory.total):>9} "
                     f"{_gib(b.memory.total - a.memory.total):>7}")
    return "\n".join(lines)


def refusal(plan: Plan) -> str | None:
    """Why a run must not start (a stage does not fit), with the batch that would; None if it fits."""
    if not plan.misfits:
        return None
    parts = [f"{row.stage} needs {_gib(row.memory.total)} GiB of {_gib(plan.usable)} usable"
             + (f" (device batch {row.largest_batch} fits: pass --device-batch-size {row.largest_batch})"
                if row.largest_batch else "") for row in plan.misfits]
    return f"{plan.cfg.model_tag} does not fit {plan.gpu.label}: " + "; ".join(parts)


# -----------------------------------------------------------------------------
# measuring the same step on CPU (validation (a), bench/rehearsal.py)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def measure_cpu_step(cfg: Config, steps: int = 2) -> dict:
    """Run `steps` real training steps of train/loop.py on CPU in this process; return the peak RSS
    of the last one above the RSS just before it, and the RSS the model + optimizer state hold.

    Linux only (/proc/self/clear_refs resets the peak). Run it in a fresh process started with
    MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the OS and RSS follows live memory.
    """
    import numpy as np
    import torch

    from nanochat_ray.gpt import build_gpt, release_scratch
    from nanochat_ray.optim import build_optimizers
    from nanochat_ray.train.loop import TrainState, run

    torch.manual_seed(cfg.seed)
    before_model = _status_kib("VmRSS") * 1024
    model = build_gpt(cfg.gpt_config(), "cpu")
    optimizers = build_optimizers(model, cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (cfg.total_batch_size // cfg.seq_len, cfg.seq_len + 1))
    state = TrainState()
    result = {}
    for step in range(steps):
        release_scratch()  # the plan counts the head's buffers as a step's temporaries, as on a GPU
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        start = _status_kib("VmRSS") * 1024
        run(cfg, model, optimizers, lambda s: (lambda: (rows, {})), lambda *a: None, state, step + 1, 1.0)
        result = {"static": start - before_model, "peak_above": _status_kib("VmHWM") * 1024 - start}
    return result


def cpu_estimate(cfg: Config) -> dict:
    """The plan's figures for measure_cpu_step's configuration: one process, fp32, eager."""
    r = recipe()
    accum = cfg.grad_accum_steps(1)
    m = train_memory(cfg, r, 1, cfg.device_batch_size * cfg.seq_len, "eager-fp32", accum)
    static = param_bytes(cfg, r) + optimizer_bytes(cfg, r, 1)[0]
    return {"static": static, "peak_above": m.total - static, "memory": m}
