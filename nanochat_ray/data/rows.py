"""
Token rows for the model, Ray-free: a validation shard packed into rows, and rows turned into
(inputs, targets) batches. The training loop (train/loop.py), the stages' evaluations and the
eval actors share them.

    rows = val_rows("shard_00000.parquet", tokenizer, cfg, rank=0, world_size=1)
    inputs, targets = to_batch(rows[:8], torch.device("cpu"))   # python jobs/base_eval.py
"""

from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

# PAD_ID is all the data actors take from here: torch and the config are imported where they are
# used, so that those processes never import torch (~1 CPU second each, on the way to step 1)
if TYPE_CHECKING:
    import torch

    from nanochat_ray.config import Config
    from nanochat_ray.tokenizer import Tokenizer

PAD_ID = -1  # token id of padding in chat rows: not a real token, so not counted as trained on

VAL_DOCS_PER_BATCH = 64  # documents tokenized at a time for the validation rows


def to_batch(rows: np.ndarray, device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token rows → inputs (B, T) and targets (B, T), int64 on the device.

    rows is (B, T+1) tokens (pretraining: every target counts) or (B, 2, T+1) tokens and a loss
    mask (chat stages: targets whose mask is 0 become -1, which the loss ignores; padding, PAD_ID
    with mask 0, is fed as token 0: causal attention keeps it out of every real position).
    """
    import torch

    rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    if device.type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)  # overlaps the copy with compute
    if rows.ndim == 3:
        tokens, mask = rows[:, 0], rows[:, 1]
        return tokens[:, :-1].clamp(min=0), tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    return rows[:, :-1], rows[:, 1:]


def val_rows(val_shard: str, tokenizer: "Tokenizer", cfg: "Config", rank: int, world_size: int) -> np.ndarray:
    """This worker's share of the first cfg.eval_tokens tokens of the validation shard, packed."""
    row_len = cfg.seq_len + 1
    wanted = cfg.eval_tokens // cfg.seq_len  # rows over all workers
    stream: list[int] = []
    shard = pq.ParquetFile(val_shard)
    # documents in small batches, stopping once there are enough tokens: a shard can be one row
    # group of millions of characters, and the evaluation needs the first ~eval_tokens of it
    for batch in shard.iter_batches(batch_size=VAL_DOCS_PER_BATCH, columns=["text"]):
        for ids in tokenizer.encode(batch.column("text").to_pylist(), prepend="<|bos|>"):
            stream += ids
        if len(stream) >= wanted * row_len:
            break
    available = len(stream) // row_len
    if available < world_size:
        raise ValueError(f"validation shard {val_shard} holds {available} rows of {row_len} tokens, "
                         f"fewer than the {world_size} workers; use a bigger val shard or a shorter seq_len")
    rows = np.array(stream[:min(wanted, available) * row_len], dtype=np.int32).reshape(-1, row_len)
    return rows[rank::world_size][: len(rows) // world_size]  # equal shares: every rank runs the same batches
