"""
Run configuration: one dial (depth) plus named presets, all plain data.

    cfg = config_from_argv(["--preset", "smoke", "--depth", "3"])

Every job takes `--preset NAME` (default: `d20` when the Ray cluster, or without one this
machine, has a GPU, else `cpu`) and a `--field-name VALUE` flag for every field below. Bad values fail here, before any work,
with a message that names the field.

Run by: every job reads it (e.g. python jobs/pretrain.py --preset cpu --depth 6); tested by python -m pytest tests/test_config.py.
"""

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from nanochat_ray.gpt import GPTConfig


MAX_DEPTH = 128  # d128 is 8,192 wide and ~100B parameters: beyond that a depth is a typo


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class Config:
    # --- model: depth is the dial, the rest follows from it (SPEC §3)
    depth: int = 20  # number of transformer blocks
    aspect_ratio: int = 64  # model_dim = depth * aspect_ratio
    head_dim: int = 128  # n_head = ceil(model_dim / head_dim)
    n_kv_head: int = 0  # key/value heads; 0 = same as the query heads (no GQA)
    seq_len: int = 2048  # context length in tokens
    vocab_size: int = 65536  # tokenizer vocabulary, 9 special tokens included
    # --- batch (SPEC §5): gradient accumulation makes up total_batch_size
    device_batch_size: int = 32  # sequences per worker per micro-step
    total_batch_size: int = 524288  # tokens per optimizer step, over all workers
    # --- horizon: the first one set wins (iterations > FLOPs > tokens:params ratio)
    num_iterations: int = -1  # explicit number of optimizer steps
    target_flops: float = -1.0  # total training FLOPs
    target_param_data_ratio: float = 20.0  # tokens = ratio * params (Chinchilla)
    # --- optimizer (SPEC §4); AdamW LRs are scaled by (model_dim/768)^-0.5 in optim.py
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02  # Muon
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off (midtraining, SFT and RL default to 0, as the reference)
    muon_momentum_warmup: int = 300  # steps of Muon momentum 0.85 → 0.95; 0 = 0.95 throughout (SFT, RL)
    loss_weighting: str = "micro_batch"  # micro_batch: mean per micro-batch, then over them (the reference);
    # token: one mean over every counted target of the step (differs only when micro-batches count unequally: SFT)
    warmup_ratio: float = 0.0  # fraction of steps with a linear LR warm-up
    warmdown_ratio: float = 0.2  # fraction of steps with a linear LR decay at the end
    final_lr_frac: float = 0.0  # LR multiplier reached at the very end
    init_lr_frac: float = 1.0  # every LR above starts at this fraction (SFT: 0.02, RL: 0.05)
    # --- evaluation and logging during training
    eval_every: int = 250  # steps between val bpb evaluations
    eval_tokens: int = 20 * 524288  # tokens per val bpb evaluation
    core_every: int = 2000  # steps between CORE evaluations; -1 = never
    core_max_per_task: int = 500  # examples per CORE task during training
    sample_every: int = 2000  # steps between samples from fixed prompts
    save_every: int = 1000  # steps between checkpoints; the last step is always saved
    # --- tokenizer (SPEC §2)
    tokenizer_max_chars: int = 2_000_000_000  # characters of training text
    tokenizer_doc_cap: int = 10_000  # each document is cut to this many characters
    # --- runtime
    seed: int = 42
    run: str = "dummy"  # wandb run name; "dummy" = no wandb
    dtype: str = "auto"  # auto = bf16 autocast on CUDA and CPUs with native bf16 (common.native_bf16), else fp32; or float32 / bfloat16
    compile: str = "auto"  # auto = torch.compile on CUDA only; or on / off

    # --- derived quantities -------------------------------------------------

    @property
    def model_dim(self) -> int:
        return self.depth * self.aspect_ratio

    @property
    def n_head(self) -> int:
        return max(1, math.ceil(self.model_dim / self.head_dim))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(sequence_len=self.seq_len, vocab_size=self.vocab_size, n_layer=self.depth,
                         n_head=self.n_head, n_kv_head=self.kv_heads, n_embd=self.model_dim)

    @property
    def model_tag(self) -> str:
        """Name under which this model's checkpoints live, e.g. d20."""
        return f"d{self.depth}"

    def grad_accum_steps(self, world_size: int) -> int:
        return self.total_batch_size // (self.device_batch_size * self.seq_len * world_size)

    def iterations(self, num_params: int, flops_per_token: int) -> int:
        """Optimizer steps for the chosen horizon."""
        if self.num_iterations > 0:
            return self.num_iterations
        if self.target_flops > 0:
            return max(1, int(self.target_flops // (flops_per_token * self.total_batch_size)))
        return max(1, int(self.target_param_data_ratio * num_params // self.total_batch_size))

    def horizon(self) -> int:
        """Optimizer steps of a full run, before any model exists: a fixed num_iterations as it is;
        a horizon from the model's size counts the parameters of one built on the meta device
        (its first use costs a second of torch imports, so a fixed horizon skips it)."""
        if self.num_iterations > 0:
            return self.num_iterations
        from nanochat_ray.gpt import GPT

        with torch.device("meta"):  # the parameter count only: no memory, no init
            model = GPT(self.gpt_config())
        return self.iterations(model.num_params(), model.estimate_flops())

    def lr_multiplier(self, step: int, num_iterations: int) -> float:
        """Warm-up, constant, then linear warm-down to final_lr_frac (SPEC §5)."""
        warmup = round(self.warmup_ratio * num_iterations)
        warmdown = round(self.warmdown_ratio * num_iterations)
        if step < warmup:
            return (step + 1) / warmup
        if step <= num_iterations - warmdown:
            return 1.0
        progress = (num_iterations - step) / warmdown
        return progress + (1 - progress) * self.final_lr_frac

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -----------------------------------------------------------------------------
# Presets: a base plus the fields that differ.

PRESETS: dict[str, dict] = {
    # seconds on a CPU: the tests' preset
    "smoke": dict(depth=2, seq_len=64, vocab_size=1024, device_batch_size=2, total_batch_size=256,
                  num_iterations=8, eval_every=4, eval_tokens=2048, core_every=-1, core_max_per_task=8,
                  sample_every=-1, save_every=4, tokenizer_max_chars=2_000_000,
                  dtype="float32"),  # fp32 on every CPU: the tests' tolerances must not depend on the machine
    # SPEC §14: what a laptop or CI can run; proves the plumbing, not the quality
    "cpu": dict(depth=4, seq_len=1024, device_batch_size=1, total_batch_size=1024, num_iterations=50,
                eval_every=25, eval_tokens=16 * 1024, core_every=-1, core_max_per_task=12,
                sample_every=50, save_every=50),
    # the speedrun: 8×H100, ~4 hours, 561M parameters, 11.2B tokens
    "d20": dict(depth=20),
    # bigger models trade per-device batch for memory; accumulation keeps the total batch
    "d26": dict(depth=26, device_batch_size=16),
    "d32": dict(depth=32, device_batch_size=8),
}


def cluster_gpus() -> tuple[float, str]:
    """(GPUs, where that count comes from): the Ray cluster's when this process is on one (a job
    submitted from a CPU head trains on the workers' GPUs), else this machine's CUDA devices."""
    import sys

    on_cluster = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or bool(os.environ.get("RAY_ADDRESS"))
    if on_cluster or ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        from nanochat_ray.common import init_ray  # only here: the core does not import Ray otherwise

        init_ray()
        import ray

        return ray.cluster_resources().get("GPU", 0), "the Ray cluster"
    return torch.cuda.device_count(), "this machine (no Ray cluster)"


# -----------------------------------------------------------------------------
# Stage defaults: what each stage after pretraining sets over its preset. Any flag overrides them.

RL_CONFIG = {  # Config fields of the RL stage, per preset (SPEC §10: 5% of base LRs, linear decay)
    "smoke": dict(num_iterations=8, eval_every=4, save_every=4),
    "cpu": dict(num_iterations=10, eval_every=5, save_every=5),
}
RL_CONFIG_DEFAULT = dict(num_iterations=-1, eval_every=60, save_every=60)  # -1: one epoch of GSM8K train
# RLOptions fields (rl/driver.py) per preset: small presets sample little and evaluate few questions,
# so the plumbing runs in seconds (smoke) or minutes (cpu); the GPU presets take SPEC §10 as it is
RL_OPTIONS = {
    "smoke": dict(questions_per_step=2, samples_per_question=4, max_new_tokens=16, eval_questions=4),
    "cpu": dict(questions_per_step=4, samples_per_question=4, max_new_tokens=64, eval_questions=16),
}

# How much of each evaluation the speedrun runs on the small presets (base: base_eval's flags; chat:
# chat_eval's): cpu keeps the whole run short on 2 cores, as the reference's CPU recipe caps its
# evaluations at 12-20 problems per task (SPEC §14); smoke only checks the plumbing. Other presets
# evaluate everything, as the reference.
EVAL_SIZES = {
    "smoke": {"base": dict(max_per_task=2), "chat": dict(max_per_task=2, max_new_tokens=16)},
    "cpu": {"base": dict(max_per_task=8), "chat": dict(max_per_task=12, max_new_tokens=128)},
}


def stage_defaults(stage: str, preset: str) -> dict:
    """The Config fields `stage` (base | mid | sft | rl) sets over `preset`'s.

    As the reference: no gradient clipping after pretraining. Midtraining keeps pretraining's Muon
    momentum warm-up; SFT and RL use a constant momentum. SFT (SPEC §9): 32 conversations per step
    (fewer if the preset's batch holds fewer rows), 4 per micro-batch, LR from 2% of the base LRs
    linearly to 0. RL (SPEC §10): LR from 5% of the base LRs linearly to 0.
    """
    if stage == "mid":
        return dict(grad_clip=0.0)
    if stage == "sft":
        base = make_config(preset)
        rows = min(32, base.total_batch_size // base.seq_len)
        return dict(init_lr_frac=0.02, warmdown_ratio=1.0, device_batch_size=min(4, base.device_batch_size),
                    total_batch_size=rows * base.seq_len, grad_clip=0.0, muon_momentum_warmup=0)
    if stage == "rl":
        return dict(init_lr_frac=0.05, warmdown_ratio=1.0, final_lr_frac=0.0, grad_clip=0.0, muon_momentum_warmup=0,
                    **RL_CONFIG.get(preset, RL_CONFIG_DEFAULT))
    return {}


def default_preset() -> str:
    """d20 where there are GPUs to train on, cpu otherwise; prints which and why."""
    gpus, where = cluster_gpus()
    preset = "d20" if gpus > 0 else "cpu"
    print(f"preset {preset}: no --preset given and {where} has {gpus:g} GPU(s)", flush=True)
    return preset


def make_config(preset: str, **overrides) -> Config:
    """Preset plus overrides, type-checked and validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {**PRESETS[preset], **overrides}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config field {key!r}; valid fields: {', '.join(fields)}")
        want = type(fields[key].default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif type(value) is not want:
            raise ConfigError(f"field {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}")
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int = 1) -> None:
    """Reject impossible combinations before any work starts."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name in ("depth", "aspect_ratio", "head_dim", "seq_len", "device_batch_size", "total_batch_size"):
        check(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    check(cfg.depth <= MAX_DEPTH, f"depth must be at most {MAX_DEPTH} (d{MAX_DEPTH} is already ~100B parameters "
                                  f"at aspect_ratio 64), got {cfg.depth}")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"):
        check(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    check(cfg.vocab_size >= 256 + 9, f"vocab_size must be at least 265 (256 bytes + 9 special tokens), got {cfg.vocab_size}")
    check(cfg.model_dim % cfg.n_head == 0,
          f"depth {cfg.depth} gives model_dim {cfg.model_dim}, not divisible by n_head {cfg.n_head} "
          f"(= ceil(model_dim / head_dim {cfg.head_dim})); pick another depth or head_dim")
    check(cfg.n_kv_head >= 0 and cfg.n_head % cfg.kv_heads == 0,
          f"n_kv_head {cfg.n_kv_head} must divide n_head {cfg.n_head} (or be 0 for n_head)")
    check((cfg.model_dim // cfg.n_head) % 2 == 0, f"head size {cfg.model_dim // cfg.n_head} must be even for rotary")
    tokens_per_micro_step = cfg.device_batch_size * cfg.seq_len * world_size
    check(cfg.total_batch_size % tokens_per_micro_step == 0,
          f"total_batch_size {cfg.total_batch_size} is not divisible by device_batch_size {cfg.device_batch_size} "
          f"× seq_len {cfg.seq_len} × workers {world_size} = {tokens_per_micro_step}; "
          f"make total_batch_size a multiple of {tokens_per_micro_step}")
    check(0 <= cfg.warmup_ratio and 0 <= cfg.warmdown_ratio and cfg.warmup_ratio + cfg.warmdown_ratio <= 1,
          f"warmup_ratio {cfg.warmup_ratio} + warmdown_ratio {cfg.warmdown_ratio} must lie in [0, 1]")
    check(0 <= cfg.final_lr_frac <= 1, f"final_lr_frac must lie in [0, 1], got {cfg.final_lr_frac}")
    check(0 < cfg.init_lr_frac <= 1, f"init_lr_frac must lie in (0, 1], got {cfg.init_lr_frac}")
    check(cfg.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    check(cfg.compile in ("auto", "on", "off"), f"compile must be auto, on or off, got {cfg.compile!r}")
    check(cfg.loss_weighting in ("micro_batch", "token"),
          f"loss_weighting must be micro_batch or token, got {cfg.loss_weighting!r}")
    check(cfg.grad_clip >= 0 and cfg.muon_momentum_warmup >= 0,
          f"grad_clip ({cfg.grad_clip}) and muon_momentum_warmup ({cfg.muon_momentum_warmup}) must be >= 0")
    check(cfg.num_iterations > 0 or cfg.target_flops > 0 or cfg.target_param_data_ratio > 0,
          "set a horizon: num_iterations, target_flops or target_param_data_ratio")
    check(cfg.eval_every <= 0 or cfg.eval_tokens >= tokens_per_micro_step,
          f"eval_tokens {cfg.eval_tokens} is less than one batch (device_batch_size × seq_len × workers "
          f"= {tokens_per_micro_step}): the val evaluation would see no data")
    check(cfg.eval_tokens % (cfg.device_batch_size * cfg.seq_len) == 0 or cfg.eval_every <= 0,
          f"eval_tokens {cfg.eval_tokens} must be a multiple of device_batch_size × seq_len "
          f"= {cfg.device_batch_size * cfg.seq_len}")


# -----------------------------------------------------------------------------
# Command line: --preset plus one flag per field.


def _finite(kind: type):
    # argparse's type=float accepts "nan"; we only want finite numbers
    def parse(text: str):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config (preset plus overrides)")
    group.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="named preset (default: d20 when the Ray cluster, or without one this "
                            "machine, has a GPU; else cpu)")
    for f in dataclasses.fields(Config):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           type=_finite(type(f.default)), metavar=type(f.default).__name__.upper(),
                           help=f"default from the preset ({f.default!r} in d20)")


def config_from_args(args: argparse.Namespace, stage: str | None = None) -> Config:
    """Preset, then the stage's defaults (stage_defaults, e.g. SFT's smaller batch), then the
    command line's overrides."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
    preset = args.preset or default_preset()
    defaults = stage_defaults(stage, preset) if stage else {}
    return make_config(preset, **{**defaults, **overrides})


def config_from_argv(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))
