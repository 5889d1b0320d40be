"""
The RL arithmetic, plain torch (SPEC §10): sample groups with the engine, advantages, the loss.

    groups = sample_groups(model, tokenizer, prompts, seeds, num_samples=16, max_tokens=256)
    advantages = group_advantages(rewards)                       # reward − its question's mean
    loss = question_loss(model, group, rows_per_pass)             # backward() done, normalised

The loss is the reference's: per question, −Σ logprob(token) × advantage over the tokens the
model sampled, divided by the number of such tokens of that question; then the mean over the
step's questions. Prompt tokens, the calculator's forced tokens and the terminal token
(<|assistant_end|> / <|bos|>) have mask 0, so target −1: context, never trained on (the
reference's engine leaves the terminal token out of the sequence). No KL, no clipping: on-policy.

Run by: python jobs/rl.py --preset cpu; tested by python -m pytest tests/test_rl.py.
"""

import contextlib
from dataclasses import dataclass
from math import ceil, comb

import torch

from nanochat_ray.detokenizer import answer_text
from nanochat_ray.engine import DecodeBatch
from nanochat_ray.gpt import GPT, head_loss
from nanochat_ray.tokenizer import Tokenizer


@dataclass
class Group:
    """num_samples completions of one prompt; tokens end with the terminal token when one was sampled."""
    prompt: list[int]
    tokens: list[list[int]]  # generated ids per sample
    masks: list[list[int]]  # 1 = sampled by the model and trained on; 0 = forced by the calculator, or terminal
    rewards: list[float] | None = None

    def completions(self, tokenizer: Tokenizer) -> list[str]:
        """Decoded answers, cut before <|assistant_end|> / <|bos|>."""
        return [answer_text(tokenizer, t) for t in self.tokens]


@torch.inference_mode()
def sample_groups(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], seeds: list[int],
                  num_samples: int, max_tokens: int, temperature: float = 1.0, top_k: int | None = 50) -> list[Group]:
    """Decode every sample of every prompt together in one DecodeBatch.

    Sample i of prompt j is seeded with seeds[j] + i, so it is what Engine.generate(prompts[j],
    seed=seeds[j]) yields for row i, whatever else shares the batch.
    """
    longest = max(len(p) for p in prompts)
    batch = DecodeBatch(model, tokenizer, max_rows=len(prompts) * num_samples, seq_len=longest + max_tokens)
    groups = [Group(p, [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]) for p in prompts]
    owner = {}  # row id → (group, sample)
    for j, (prompt, seed) in enumerate(zip(prompts, seeds)):
        ids = batch.add(prompt, num_samples, max_tokens, temperature, top_k, seed)
        owner.update((row, (j, i)) for i, row in enumerate(ids))
    while len(batch):
        for row, generated in batch.step().items():
            j, i = owner[row]
            groups[j].tokens[i].append(generated.token)
            groups[j].masks[i].append(0 if generated.token in tokenizer.answer_end_ids else generated.mask)
    return groups


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(questions, samples) rewards → reward minus its question's mean (no std division)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


def policy_batch(sequences: list[list[int]], masks: list[list[int]], advantages: list[float],
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole sequences (prompt + completion) and their masks → inputs (B, T), targets (B, T) and
    advantages (B,). Targets are −1 where the mask is 0 (prompt, forced tool output) and in the
    right padding, so only sampled tokens count."""
    longest = max(len(s) for s in sequences) - 1
    inputs = torch.zeros(len(sequences), longest, dtype=torch.long)
    targets = torch.full((len(sequences), longest), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(sequences, masks)):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {row} has {len(ids)} tokens but {len(mask)} mask entries")
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
        inputs[row, :len(ids) - 1] = ids_t[:-1]
        targets[row, :len(ids) - 1] = ids_t[1:].masked_fill(mask_t[1:] == 0, -1)
    return inputs.to(device), targets.to(device), torch.tensor(advantages, dtype=torch.float32, device=device)


def policy_loss_sum(model: GPT, inputs: torch.Tensor, targets: torch.Tensor,
                    advantages: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ −logprob × advantage over the valid (sampled) tokens, and how many there were.

    Unnormalised, so micro-batches can be summed as they arrive and the step divided by its
    total count at the end (the same number as one big batch). The lm_head runs at the valid
    positions only: it is most of a small model's FLOPs (vocab × width per token), and most
    positions are prompt.
    """
    valid = targets >= 0  # (B, T)
    hidden = model.hidden_states(inputs)[valid]  # (N, n_embd)
    nll = head_loss(hidden, model.lm_head.weight, targets[valid], reduction="none")  # (N,), as GPT.forward's
    return (nll * advantages[:, None].expand_as(targets)[valid]).sum(), int(valid.sum())


def default_questions_per_call(questions: int, actors: int) -> int:
    """Questions per rollout call when not given: half an actor's share of the step, so each actor's
    share comes in two calls and the learner starts on the first while the second samples."""
    return max(1, ceil(ceil(questions / actors) / 2))


def question_loss(model: GPT, group: Group, rows_per_pass: int,
                  autocast_ctx: contextlib.AbstractContextManager | None = None) -> float:
    """Backpropagate one question's policy loss, normalised by its own sampled tokens (the
    reference's normalisation); returns the loss. The caller divides the step's gradient by its
    number of questions. Samples go `rows_per_pass` at a time, which changes nothing but memory."""
    advantages = group_advantages(torch.tensor(group.rewards, dtype=torch.float32)[None])[0].tolist()
    sequences = [group.prompt + tokens for tokens in group.tokens]
    masks = [[0] * len(group.prompt) + mask for mask in group.masks]
    valid = max(1, sum(map(sum, group.masks)))
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(sequences), rows_per_pass):
        inputs, targets, row_advantages = policy_batch(sequences[i:i + rows_per_pass], masks[i:i + rows_per_pass],
                                                       advantages[i:i + rows_per_pass], device)
        with autocast_ctx or contextlib.nullcontext():
            loss_sum, _ = policy_loss_sum(model, inputs, targets, row_advantages)
        (loss_sum / valid).backward()
        total += loss_sum.item() / valid
    return total


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= {num_samples} samples")
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)
