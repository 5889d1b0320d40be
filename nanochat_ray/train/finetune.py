"""
Midtraining and SFT (SPEC §7, §9): the data source of the `mid` and `sft` stages, and their driver.

    python jobs/midtrain.py --preset cpu       # base → mid: conversations packed into rows
    python jobs/sft.py --preset cpu            # mid → sft: one conversation per row, padded

Both render task mixtures with tokenizer.render_conversation. As in the reference, midtraining
trains on every token of the packed conversations (and its val bpb counts them all); SFT trains
only on what the assistant says (mask 1), tool outputs and user turns being context.

The driver starts a ChatFeeder (data/pipeline.py): Ray Data actors render the seeded mixture in
order, while the workers train, and each worker receives only its slice of each step. Step s
always takes the same rows (mid) or conversations (sft), whatever the number of workers, so runs
are reproducible; the data position saved with a checkpoint (conversation, and for mid the tokens
of it already trained on) makes a resume continue exactly.
"""

import functools
import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import ray
import torch

from nanochat_ray.common import autocast, compute_dtype, init_ray
from nanochat_ray.config import Config, ConfigError, config_from_args
from nanochat_ray.data.pipeline import ChatFeeder, feeder_batches, get_within, pack_rows
from nanochat_ray.data.registry import DataUnavailableError, mirror_root
from nanochat_ray.evals.bpb import evaluate_bpb
from nanochat_ray.evals.chatcore import evaluate_categorical, load_eval_task
from nanochat_ray.gpt import GPT
from nanochat_ray.tasks import (ARC, GSM8K, MMLU, Identity, SimpleSpelling, SmolTalk, SpellingBee, Task,
                                TaskMixture)
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.data.rows import to_batch
from nanochat_ray.stage import SAMPLE_QUESTIONS, RunOptions, check_stage, previous_checkpoint
from nanochat_ray.train.cli import add_trainer_args, done_line, run_options, training_parser
from nanochat_ray.train.loop import Batches, Periodic, TrainState, sum_over_workers
from nanochat_ray.train.worker import TrainSpec, fit

QUICK_EVAL_EXAMPLES = 64  # MMLU and ARC-Easy questions of each SFT evaluation


class Fallbacks:
    """The mirror lacks some splits (MMLU auxiliary_train, ARC train): a stand-in is used, said once.

    The driver probes (`known=None`) and records what is missing; workers get that record and
    build the same mixture without probing (a failed download costs seconds of retries).
    """

    def __init__(self, known: set[str] | None = None):
        self.probe = known is None
        self.missing = set() if known is None else set(known)

    def pick(self, name: str, build, fallback, fallback_name: str) -> Task:
        if self.probe:
            try:
                return build()
            except DataUnavailableError as e:
                print(f"{name} is not available ({str(e).split(':')[0]}); using {fallback_name} instead")
                self.missing.add(name)
        return fallback() if name in self.missing else build()


def training_mixture(stage: str, data_root: str | None, seed: int, fallbacks: Fallbacks) -> TaskMixture:
    """SPEC §7 (mid) and §9 (sft) mixtures."""
    identity = Identity(data_root)
    if stage == "mid":
        mmlu = fallbacks.pick("MMLU auxiliary_train", lambda: MMLU("auxiliary_train", data_root),
                              lambda: TaskMixture([MMLU("dev", data_root), MMLU("validation", data_root)], seed=seed),
                              "MMLU dev + validation")
        tasks = [SmolTalk("train", data_root), mmlu, GSM8K("train", data_root), identity, identity,  # identity ×2
                 SimpleSpelling(200_000, "train", data_root), SpellingBee(80_000, "train", data_root)]
    else:
        arc = [fallbacks.pick(f"{subset} train", lambda subset=subset: ARC(subset, "train", data_root),
                              lambda subset=subset: ARC(subset, "validation", data_root),
                              f"{subset} validation (the chat evals use test)")
               for subset in ("ARC-Easy", "ARC-Challenge")]
        tasks = arc + [GSM8K("train", data_root), SmolTalk("train", data_root, stop=10_000), identity,
                       SimpleSpelling(300, "train", data_root), SpellingBee(300, "train", data_root)]
    return TaskMixture(tasks, seed=seed)


def validation_mixture(data_root: str | None, seed: int) -> TaskMixture:
    return TaskMixture([SmolTalk("test", data_root), MMLU("test", data_root, stop=5_200),
                        GSM8K("test", data_root, stop=420)], seed=seed)


def packed_rows(task: Task, tokenizer: Tokenizer, row_len: int, masked: bool = False) -> Iterator[np.ndarray]:
    """Conversations (rendered as the reference, up to 2,048 tokens each) concatenated and cut
    into rows, epoch after epoch: (row_len,) tokens, every target counting (midtraining), or with
    `masked` (2, row_len) tokens and the assistant mask."""
    def rendered():
        for i in itertools.cycle(range(len(task))):
            ids, mask = tokenizer.render_conversation(task[i])
            yield i, np.array([ids, mask] if masked else ids, dtype=np.int32)
    return (row for row, _, _ in pack_rows(rendered(), row_len))


@dataclass
class ChatData:
    """The rows of a chat stage, from the driver's ChatFeeder; val bpb on the validation mixture."""
    stage: str  # mid (packed) or sft (padded)
    tokenizer_dir: str
    data_root: str | None
    feeder: "ray.actor.ActorHandle"
    conversations: int  # in one epoch of the mixture

    def _rows_per_step(self, cfg: Config) -> int:
        return cfg.total_batch_size // cfg.seq_len

    def iterations(self, cfg: Config, model: GPT) -> int:
        if cfg.num_iterations > 0:
            return cfg.num_iterations
        if self.stage == "sft":  # one epoch of conversations
            return max(1, self.conversations // self._rows_per_step(cfg))
        # one epoch of packed rows: the feeder's actors count the tokens (started by the driver)
        tokens = ray.get(self.feeder.epoch_tokens.remote())
        return max(1, tokens // ((cfg.seq_len + 1) * self._rows_per_step(cfg)))

    def open(self, cfg: Config, rank: int, world_size: int, state: TrainState, device: torch.device) -> Batches:
        if "step" in state.data_position:
            raise ConfigError(f"this {self.stage} checkpoint was written before chat data streamed (its data "
                              "position is a step): start the stage over with --fresh")
        return feeder_batches(self.feeder, cfg, rank, world_size, state)

    def evaluations(self, cfg: Config, model: GPT, tokenizer: Tokenizer, rank: int, world_size: int,
                    device: torch.device) -> Periodic:
        """Val bits per byte on the validation mixture, packed: over every token for mid (what it
        trains on), over the assistant's tokens for sft. SFT adds quick MMLU and ARC-Easy accuracy
        (SPEC §9) on a few test questions, shared over workers."""
        rows_total = max(world_size, cfg.eval_tokens // cfg.seq_len)
        stream = packed_rows(validation_mixture(self.data_root, cfg.seed), tokenizer, cfg.seq_len + 1,
                             masked=self.stage == "sft")
        if self.stage == "sft":
            stream = (row for row in stream if row[1, 1:].any())  # user text alone counts nothing in bpb
        rows = np.stack([next(stream) for _ in range(rows_total)])[rank::world_size][:rows_total // world_size]
        val_batches = [to_batch(rows[i:i + cfg.device_batch_size], device)
                       for i in range(0, len(rows), cfg.device_batch_size)]
        token_bytes = tokenizer.token_bytes().to(device)
        ctx = autocast(device, compute_dtype(cfg.dtype, device))
        quick = {} if self.stage != "sft" else {
            "mmlu_acc": load_eval_task("MMLU", self.data_root), "arc_easy_acc": load_eval_task("ARC-Easy", self.data_root)}

        def evaluate() -> dict:
            metrics = {"val_bpb": evaluate_bpb(model, val_batches, token_bytes, ctx)}
            for name, task in quick.items():
                mine = range(rank, min(len(task), QUICK_EVAL_EXAMPLES), world_size)
                result = evaluate_categorical(task, mine, model, tokenizer, cfg.device_batch_size, ctx)
                counts = sum_over_workers(torch.tensor([result.num_correct, result.num_total], device=device))
                metrics[name] = (counts[0] / counts[1]).item()
            return metrics
        return [(cfg.eval_every, evaluate)]

    def first_rows_time(self) -> float | None:
        return get_within(self.feeder.first_rows_time.remote(), "its first rows' time")

    def sample_prompts(self, tokenizer: Tokenizer) -> list[list[int]]:
        return [tokenizer.render_for_completion({"messages": [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": ""}]})
                for q in SAMPLE_QUESTIONS]


def chat_feeder(stage: str, cfg: Config, run: RunOptions, data_root: str | None, missing: set[str],
                conversations: int) -> "ray.actor.ActorHandle":
    """The ChatFeeder of a stage: run.data_actors Ray Data actors render its mixture (built on each,
    with the stand-ins for the `missing` splits the driver found)."""
    mixture = functools.partial(training_mixture, stage, data_root, cfg.seed, Fallbacks(missing))
    return ChatFeeder.remote(mixture, conversations, str(run.tokenizer_dir), cfg.seq_len, stage == "mid",
                             run.data_actors, run.data_actor_cpus)


def chat_train(stage: str, cfg: Config, run: RunOptions) -> dict:
    """Midtrain (stage "mid", from the latest base checkpoint) or SFT (stage "sft", from mid)."""
    stage_dir = check_stage(cfg, stage, run)
    start_from = previous_checkpoint(stage, cfg, run.artifact_root)
    mirror = mirror_root(run.data_root)  # resolved here: workers see neither relative paths nor our environment
    mirror = str(mirror) if mirror else None
    fallbacks = Fallbacks()
    mixture = training_mixture(stage, mirror, cfg.seed, fallbacks)  # missing data fails here, before Ray
    print(f"{stage}: {len(mixture):,} conversations, starting from {start_from}")
    init_ray()
    feeder = chat_feeder(stage, cfg, run, mirror, fallbacks.missing, len(mixture))
    if stage == "mid" and cfg.num_iterations <= 0:
        feeder.epoch_tokens.remote()  # the horizon: counted on the data actors while the workers start
    data = ChatData(stage, str(run.tokenizer_dir), mirror, feeder, len(mixture))
    spec = TrainSpec(stage, cfg, stage_dir, data, resume=run.resume, init_from=start_from,
                     fail_at_step=run.fail_at_step)
    try:
        return fit(spec, run)
    finally:
        ray.kill(feeder)


def main(stage: str, description: str, argv: list[str] | None = None) -> dict:
    """The command line of jobs/midtrain.py and jobs/sft.py: the training flags over the stage's defaults."""
    parser = training_parser(description)
    add_trainer_args(parser)
    args = parser.parse_args(argv)
    result = chat_train(stage, config_from_args(args, stage), run_options(args))
    print(done_line(result))
    return result
