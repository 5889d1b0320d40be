"""
Checkpoints: model weights, per-rank optimizer state and a readable meta.json, per stage.

Layout (plain files, loadable with torch.load and a text editor, no framework):

    <root>/checkpoints/<stage>/<model_tag>/     stage in base|mid|sft|rl, model_tag e.g. "d20"
        LATEST                                  names the last step saved, e.g. "step_000123"
        step_000123/
            model.pt                            model state_dict (written by rank 0)
            optim_rank{r}.pt                    rank r's list of optimizer state_dicts (every rank:
                                                distributed optimizers shard their state)
            meta.json                           model config, run config, step, data position,
                                                metrics, world_size and a `files` manifest
                                                {name: {bytes, sha256}}; written last

Nothing is lost or half-read: a step is written into a hidden temp dir beside its final name,
fsynced and renamed into place, then LATEST is replaced atomically. A crash leaves either a whole
step or a temp dir that is ignored. Every file is checked against the manifest before loading,
and the newest step that checks out is the one resumed.

    save_checkpoint(checkpoint_dir("base", "d20"), step, model.state_dict(), optim_states, meta)
    model_state, optim_states, meta = load_checkpoint(checkpoint_dir("base", "d20"))

Several ranks on a shared file system: every rank calls save_checkpoint with its own optimizer
state and barrier=torch.distributed.barrier. Ray Train (train/worker.py): each rank calls
write_checkpoint into its own temp dir, rank 0 calls finalize_checkpoint with the other ranks'
file hashes, and Ray merges the directories into the step's place in storage.

Run by: every training job writes them (python jobs/pretrain.py, midtrain.py, sft.py, rl.py); tested by python -m pytest tests/test_checkpoint.py.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from nanochat_ray.common import base_dir, fsync_path, write_atomic
from nanochat_ray.gpt import GPT, GPTConfig, build_gpt

# the stage graph, in order: each stage starts from the previous one's weights, and is trained by
# jobs/<TRAIN_JOBS[stage]>.py (the speedrun, the report and the stage checks read it from here)
STAGES = ("base", "mid", "sft", "rl")
TRAIN_JOBS = {"base": "pretrain", "mid": "midtrain", "sft": "sft", "rl": "rl"}
PREVIOUS = dict(zip(STAGES[1:], STAGES))  # {"mid": "base", "sft": "mid", "rl": "sft"}
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
LATEST_FILE = "LATEST"
STEP_DIR = re.compile(r"step_(\d+)")
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def checkpoint_dir(stage: str, model_tag: str, root: str | Path | None = None) -> Path:
    """The directory holding every step of one stage of one model."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}, expected one of {STAGES}")
    check_name(model_tag, "model tag")
    return Path(root or base_dir()) / "checkpoints" / stage / model_tag


def check_name(name: str, what: str) -> str:
    """A name that becomes one path component under the artifact root: letters, digits, `_`, `-`
    and inner dots only, so `../x`, `/abs` or `a/b` can never point outside it."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' "
                         f"(not first), e.g. d20")
    return name


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


# -----------------------------------------------------------------------------
# writing


def write_checkpoint(directory: str | Path, model_state: dict | None, optim_state: Any,
                     rank: int = 0) -> None:
    """Write this rank's files into `directory`: model.pt on rank 0, optim_rank{rank}.pt on every
    rank (skipped when optim_state is None). Not loadable until finalize_checkpoint ran."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _save(model_state, directory / MODEL_FILE)
    if optim_state is not None:
        _save(optim_state, directory / optim_file(rank))


def finalize_checkpoint(directory: str | Path, meta: dict, world_size: int = 1,
                        other_files: dict | None = None) -> dict:
    """Rank 0, once every rank's files are written: hash them and write meta.json last.

    `other_files` describes ({name: describe_file(path)}) files the other ranks wrote into
    their own directories, for storage that merges per-rank directories (Ray Train); files
    in `directory` are hashed here. `meta` must hold "step"; dataclasses in it are stored as
    dicts. Returns the meta as written.
    """
    directory = Path(directory)
    if "step" not in meta:
        raise ValueError("meta needs a 'step'")
    files = {p.name: describe_file(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name != META_FILE}
    files.update(other_files or {})
    if MODEL_FILE not in files:
        raise CheckpointError(f"{directory} has no {MODEL_FILE}: rank 0 must call write_checkpoint first")
    shards = {n for n in files if n.startswith("optim_rank")}
    expected = {optim_file(r) for r in range(world_size)}
    if shards and shards != expected:
        raise CheckpointError(f"{directory} holds optimizer files {sorted(shards)}, but {world_size} "
                              f"ranks should have written {sorted(expected)}")
    meta = {**meta, "world_size": world_size, "files": files}
    write_atomic(directory / META_FILE, json.dumps(meta, indent=2, default=_to_json))
    fsync_path(directory)
    return meta


def save_checkpoint(stage_dir: str | Path, step: int, model_state: dict | None, optim_state: Any,
                    meta: dict | None, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] | None = None) -> Path:
    """Save one step atomically and point LATEST at it; returns the step directory.

    Every rank calls this with its own optimizer state; rank 0 also passes model_state and meta
    (model_config, run_config, data position, metrics...). With several ranks, `barrier` (e.g.
    torch.distributed.barrier) orders the phases: clean temp dir → all ranks write → rank 0
    finalizes and renames. When it returns, the step is complete for every rank.
    """
    if world_size > 1 and barrier is None:
        raise ValueError("saving from several ranks needs a barrier, e.g. torch.distributed.barrier")
    barrier = barrier or (lambda: None)
    stage_dir = Path(stage_dir)
    tmp = stage_dir / f".tmp_{step_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        tmp.mkdir(parents=True)
    barrier()
    write_checkpoint(tmp, model_state, optim_state, rank)
    barrier()
    if rank == 0:
        finalize_checkpoint(tmp, {**meta, "step": step}, world_size)
        _publish(tmp, stage_dir, step)
    barrier()
    return stage_dir / step_name(step)


def _publish(tmp: Path, stage_dir: Path, step: int) -> None:
    # rename the finished temp dir to its final name, then move LATEST
    final = stage_dir / step_name(step)
    if final.exists():
        # the same step saved again (e.g. after a resume): rename can't replace a non-empty dir
        old = stage_dir / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_path(stage_dir)
    mark_latest(stage_dir, step)


def mark_latest(stage_dir: str | Path, step: int) -> None:
    """Point LATEST at a step whose files are complete (callers check; latest_step re-verifies)."""
    write_atomic(Path(stage_dir) / LATEST_FILE, f"{step_name(step)}\n")
    fsync_path(Path(stage_dir))


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"meta.json can't hold a {type(obj).__name__}: pass plain dicts, lists, numbers, strings")


# -----------------------------------------------------------------------------
# verifying and reading


def describe_file(path: Path) -> dict:
    """Size and sha256 of one file, as meta.json's manifest records it."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def _fix(directory: Path) -> str:
    return (f"Delete {directory} and resume from an earlier step (the newest good one is picked "
            f"when no step is given), or pass --step N to load another step.")


def verify_checkpoint(directory: str | Path) -> dict:
    """Check every file against meta.json's manifest (size, then sha256); return the meta.

    Raises CheckpointError naming the bad file. Reads every byte, so it costs about as much as
    loading the checkpoint.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: no {META_FILE} (its save was interrupted). "
                              + _fix(directory))
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({e!r}). " + _fix(directory)) from e
    if problem := _meta_problem(meta, directory.name):
        raise CheckpointError(f"{meta_path} is malformed: {problem}. " + _fix(directory))
    for name, expected in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing. " + _fix(directory))
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes but {expected['bytes']} were saved "
                                  f"(truncated or overwritten). " + _fix(directory))
        if describe_file(path)["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{path} is corrupt (its sha256 differs from the saved one). "
                                  + _fix(directory))
    return meta


def _meta_problem(meta: Any, dir_name: str) -> str | None:
    """What is wrong with a parsed meta.json (None if nothing): anything written by hand, by another
    tool or half-overwritten is rejected like a corrupt file, never half-trusted."""
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    for key in ("step", "world_size", "files"):
        if key not in meta:
            return f"no {key!r}"
    if not count(meta["step"]) or meta["step"] < 0:
        return f"step must be a non-negative integer, got {meta['step']!r}"
    if STEP_DIR.fullmatch(dir_name) and int(dir_name[len("step_"):]) != meta["step"]:
        return f"it says step {meta['step']} in {dir_name}"
    if not count(meta["world_size"]) or meta["world_size"] < 1:
        return f"world_size must be a positive integer, got {meta['world_size']!r}"
    if "model_config" in meta and not isinstance(meta["model_config"], dict):
        return f"model_config must be an object, got {type(meta['model_config']).__name__}"
    files = meta["files"]
    if not isinstance(files, dict) or MODEL_FILE not in files:
        return f"the files manifest must be an object naming at least {MODEL_FILE}, got {files!r:.80}"
    for name, entry in files.items():
        if not SAFE_NAME.fullmatch(name) or name == META_FILE:
            return f"manifest entry {name!r} is not a file of this directory"
        if not (isinstance(entry, dict) and count(entry.get("bytes")) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"])):
            return f"manifest entry {name!r} needs an integer 'bytes' and a hex 'sha256', got {entry!r:.120}"
    return None


def _steps(stage_dir: Path) -> list[int]:
    # step directories only: hidden temp dirs (.tmp_step_*) never match
    if not stage_dir.is_dir():
        return []
    found = (STEP_DIR.fullmatch(p.name) for p in stage_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def _newest_good(stage_dir: Path) -> tuple[int, dict] | None:
    # LATEST first (it names the last step saved, even after resuming from an older one),
    # then every step from the highest down
    candidates = _steps(stage_dir)[::-1]
    latest = stage_dir / LATEST_FILE
    if latest.is_file() and (m := STEP_DIR.fullmatch(latest.read_text().strip())):
        candidates.insert(0, int(m.group(1)))
    for step in dict.fromkeys(candidates):  # dedupe, keep order
        try:
            return step, verify_checkpoint(stage_dir / step_name(step))
        except CheckpointError as e:
            warnings.warn(f"skipping {step_name(step)}: {e}")
    return None


def latest_step(stage_dir: str | Path) -> int | None:
    """The step to resume from: LATEST if it verifies, else the highest step that does; None if none."""
    found = _newest_good(Path(stage_dir))
    return found[0] if found else None


def read_checkpoint(directory: str | Path, device: str | torch.device = "cpu", rank: int = 0,
                    load_optimizer: bool = True) -> tuple[dict, Any, dict]:
    """Verify and load one checkpoint directory (any directory finalize_checkpoint wrote)."""
    return _read(Path(directory), verify_checkpoint(directory), device, rank, load_optimizer)


def load_checkpoint(stage_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
                    rank: int = 0, load_optimizer: bool = True) -> tuple[dict, Any, dict]:
    """(model_state, this rank's optimizer state or None, meta) of one step; step None = latest.

    Tensors land on `device` (map_location), so a GPU checkpoint loads on a CPU-only machine.
    """
    stage_dir = Path(stage_dir)
    if step is None:
        found = _newest_good(stage_dir)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {stage_dir}: train this stage first, "
                                  f"or check the model tag and base dir (NANOCHAT_BASE_DIR)")
        step, meta = found
    else:
        meta = verify_checkpoint(stage_dir / step_name(step))
    return _read(stage_dir / step_name(step), meta, device, rank, load_optimizer)


def _read(directory: Path, meta: dict, device, rank: int, load_optimizer: bool) -> tuple[dict, Any, dict]:
    model_state = torch.load(directory / MODEL_FILE, map_location=device, weights_only=True)
    optim_state = None
    if load_optimizer:
        name = optim_file(rank)
        if name not in meta["files"]:
            saved = sorted(n for n in meta["files"] if n.startswith("optim_rank")) or "no optimizer state"
            raise CheckpointError(f"{directory} has no {name} (it holds {saved}): resume with the same "
                                  f"number of ranks ({meta['world_size']}), or load without the optimizer.")
        optim_state = torch.load(directory / name, map_location=device, weights_only=True)
    return model_state, optim_state, meta


def build_model_from_checkpoint(stage: str, model_tag: str, step: int | None = None,
                                device: str | torch.device = "cpu",
                                root: str | Path | None = None) -> tuple[GPT, dict]:
    """A GPT with a stage's weights (step None = latest), plus the checkpoint's meta."""
    model_state, _, meta = load_checkpoint(checkpoint_dir(stage, model_tag, root), step, device,
                                           load_optimizer=False)
    # a torch.compile'd model's state_dict prefixes every key with `_orig_mod.`
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    model = build_gpt(GPTConfig(**meta["model_config"]), device)  # rotary tables are not in the state_dict
    model.load_state_dict(model_state, strict=True, assign=True)
    return model, meta


# -----------------------------------------------------------------------------
# finding the trained models


def trained_models(root: str | Path | None = None) -> dict[str, list[str]]:
    """{stage: [model tags with at least one finished step]} under the artifact root.

    Cheap (a finished step is one whose meta.json exists; nothing is hashed), for choosing and
    for error messages.
    """
    found: dict[str, list[str]] = {}
    for stage in STAGES:
        stage_root = Path(root or base_dir()) / "checkpoints" / stage
        tags = sorted(p.name for p in stage_root.iterdir() if p.is_dir()) if stage_root.is_dir() else []
        done = [t for t in tags if any((stage_root / t / step_name(s) / META_FILE).is_file() for s in _steps(stage_root / t))]
        if done:
            found[stage] = done
    return found


def resolve_model_tag(stage: str, model_tag: str | None, root: str | Path | None = None) -> str:
    """The model tag to load for `stage`: `model_tag` when it has a finished step, else the
    stage's only trained model. Raises CheckpointError naming what exists and how to pick."""
    models = trained_models(root)
    tags = models.get(stage, [])
    if (model_tag is None and len(tags) == 1) or (model_tag is not None and model_tag in tags):
        return model_tag or tags[0]
    where = Path(root or base_dir()) / "checkpoints"
    existing = ", ".join(f"{s}/{t}" for s, ts in models.items() for t in ts) or "none"
    if model_tag is None and len(tags) > 1:
        problem = f"{len(tags)} {stage} models are trained ({', '.join(tags)})"
    elif model_tag is None:
        problem = f"no {stage} model is trained"
    else:
        problem = f"there is no finished {stage} checkpoint for model tag {model_tag!r}"
    pairs = [(s, t) for s, ts in models.items() for t in ts]
    example = (f"--model-tag {tags[0]}" if tags else f"--stage {pairs[0][0]} --model-tag {pairs[0][1]}" if pairs
               else "--stage sft --model-tag d4")
    raise CheckpointError(f"{problem} in {where}. Checkpoints that exist: {existing}. Pick one with "
                          f"--stage and --model-tag (e.g. {example}), or train the stage first "
                          f"(python jobs/speedrun.py).")
