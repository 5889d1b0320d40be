"""Midtraining and SFT rows streamed by the ChatFeeder (Ray Data actors): the same batches as
rendering in process (as every worker did before), for 1 and 2 workers, and a resume that
continues exactly, across epochs."""

import functools
import itertools

import numpy as np
import pytest
import ray

from nanochat_ray.config import make_config
from nanochat_ray.data.pipeline import ChatFeeder, padded_rows
from nanochat_ray.tasks import GSM8K
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.train.loop import TrainState

CFG = make_config("smoke")
ROWS = CFG.total_batch_size // CFG.seq_len  # 4 rows (mid) or conversations (sft) a step
STEPS = 6


def serve(feeder, world: int, first_step: int, steps: int, position: dict | None = None) -> list[tuple[list, dict]]:
    """([rows of each rank], position after) for steps first_step, ..., as the workers ask for them."""
    ray.get(feeder.reset.remote(position or TrainState().data_position, first_step, world, ROWS // world))
    served = []
    for step in range(first_step, first_step + steps):
        got = [ray.get(feeder.get.remote(step, rank)) for rank in range(world)]
        assert all(position == got[0][1] for _, position in got)
        served.append(([rows for rows, _ in got], got[0][1]))
    return served


def in_process(stage: str, tokenizer: Tokenizer, mixture, step: int, rank: int, world: int) -> np.ndarray:
    """A worker's rows as they were made before streaming: every worker rendered the mixture."""
    share = ROWS // world
    first = step * ROWS + rank * share
    if stage == "sft":
        return padded_rows([tokenizer.render_conversation(mixture[i % len(mixture)], CFG.seq_len + 1)
                            for i in range(first, first + share)])
    ids: list[int] = []
    rows = []
    for i in itertools.cycle(range(len(mixture))):  # conversations concatenated, cut into rows
        ids += tokenizer.render_conversation(mixture[i])[0]
        while len(ids) > CFG.seq_len:
            rows.append(ids[:CFG.seq_len + 1])
            del ids[:CFG.seq_len + 1]
        if len(rows) >= first + share:
            return np.array(rows[first:first + share], dtype=np.int32)


@pytest.mark.parametrize("stage, conversations", [("mid", 3), ("sft", 10)])
def test_streamed_rows_are_the_in_process_rows_and_resume_exactly(ray_cluster, stage, conversations,
                                                                 smoke_tokenizer_dir, data_root):
    # a mixture of a few conversations, so that a few steps cross into the next epoch
    few = functools.partial(GSM8K, "train", str(data_root), stop=conversations)
    feeder = ChatFeeder.remote(few, conversations, str(smoke_tokenizer_dir), CFG.seq_len, stage == "mid",
                               num_actors=1, actor_cpus=0.0)
    try:
        one = serve(feeder, 1, 0, STEPS)  # one worker, uninterrupted
        saved = one[0][1]  # the checkpoint after the first step ...
        two = serve(feeder, 2, 1, STEPS - 1, position=saved)  # ... resumed by two workers
    finally:
        ray.kill(feeder)
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    for world, first_step, served in ((1, 0, one), (2, 1, two)):
        for step, (rows, _) in enumerate(served, first_step):
            for rank, got in enumerate(rows):
                np.testing.assert_array_equal(got, in_process(stage, tokenizer, few(), step, rank, world))
    assert [position for _, position in one[1:]] == [position for _, position in two]
    assert one[-1][1]["epoch"] > saved["epoch"]  # the steps after the resume cross an epoch boundary
    if stage == "mid":
        assert saved["token"] > 0  # and the resume starts inside a conversation
