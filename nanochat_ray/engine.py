"""
Inference on token ids (SPEC §11): KV-cached batched decoding, sampling, calculator tool use.

Three pieces, each usable alone:
- `sample_next_token`: one token per row from logits: greedy, temperature, top-k, top-p.
- `DecodeBatch`: rows decoded together one token per step; requests join (`add`) and leave
  (`remove`, or by ending) between steps, so a server can batch continuously. Each row has
  its own length in the KV cache, its own sampling settings and its own random stream.
- `Engine`: the reference's interface on top: `generate` streams columns of tokens for
  `num_samples` rows of one prompt, `generate_batch` returns whole sequences.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64): ...

Tool use: when a row emits <|python_start|> expr <|python_end|>, expr is evaluated by
`calculator.calculate` and <|output_start|> result <|output_end|> is forced into that row's
next steps with mask 0, so RL does not train on the tool's words.

Run by: python jobs/chat_cli.py, the chat server (python jobs/serve.py), RL and the chat evals; tested by python -m pytest tests/test_engine.py.
"""

import math
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanochat_ray.calculator import CalculatorError, calculate
from nanochat_ray.gpt import GPT, KVCache, kv_cache_dtype, matmul_dtype, norm, softcap
from nanochat_ray.tokenizer import Tokenizer

UNIFORM_BLOCK = 64  # random numbers a row draws from its generator at a time


def sample_next_token(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      uniform: torch.Tensor, top_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits (B, vocab) → (B,).

    Rows with temperature 0 take the argmax; the others draw from softmax(logits / temperature)
    restricted to their top_k tokens (0 = the whole vocabulary) and then to the nucleus of
    probability top_p (B,) (1 = no cut: the fewest most likely tokens whose probabilities,
    after temperature and top-k, sum to at least top_p), by inverting the CDF at
    `uniform` (B,) in (0, 1]. One number per row instead of torch.multinomial's generator keeps
    every row's draw a function of that row's own random stream.

    Overwrites `logits`: on CPU, every fresh B × vocab tensor costs page faults, and these
    passes are a good part of a decode step.
    """
    sampling = temperature > 0
    block = _block_size(logits.size(-1))
    if not sampling.all():
        greedy = _first_argmax(logits, block)
        if not sampling.any():
            return greedy
    vocab = logits.size(-1)
    if (top_k > 0).any():
        k = top_k.clamp(1, vocab)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, k[:, None] - 1)  # (B, 1)
        kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
        logits.masked_fill_(logits < kth, float("-inf"))
    # weights 2^((logits - max) · log2(e) / temperature), built in place: the same as
    # exp((logits - max) / temperature), and torch's CPU exp2 is ~3x faster than its exp
    scaled = logits.sub_(logits.amax(dim=-1, keepdim=True)).mul_((math.log2(math.e) / temperature.clamp(min=1e-6))[:, None])
    if top_p is not None and (top_p < 1).any():
        ranked, order = scaled.sort(dim=-1, descending=True)
        probs = ranked.exp2()
        probs.div_(probs.sum(dim=-1, keepdim=True))
        # drop a token when the likelier ones already hold top_p: the most likely always stays
        cut = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        scaled.scatter_(1, order, ranked.masked_fill_(cut, float("-inf")))
    drawn = _invert_cdf(scaled.exp2_(), uniform, block)
    return drawn if sampling.all() else torch.where(sampling, drawn, greedy)


def _block_size(vocab: int) -> int:
    """The largest power of two that divides vocab and is at most its square root (256 for 65,536):
    the row scans below work on vocab / block blocks of block tokens, two short passes instead of a
    long sequential one (torch's CPU argmax and cumsum are ~10x slower than its sum and amax)."""
    block = 1
    while (2 * block) ** 2 <= vocab and vocab % (2 * block) == 0:
        block *= 2
    return block


def _first_argmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """x.argmax(dim=-1), the first index of each row's maximum: the first block holding that
    maximum, then the first maximum within that block."""
    blocks = x.view(x.size(0), -1, block)
    j = blocks.amax(dim=-1).argmax(dim=-1)  # (B,)
    return j * block + blocks[torch.arange(x.size(0), device=x.device), j].argmax(dim=-1)


def _invert_cdf(weights: torch.Tensor, uniform: torch.Tensor, block: int) -> torch.Tensor:
    """Per row, the first token whose cumulative weight reaches uniform · total: u > 0 never picks a
    zero weight, and scaling by the total makes normalising unnecessary. Found by block: the
    cumulative sums of the blocks' totals locate the block, a cumulative sum inside it the token."""
    rows = torch.arange(weights.size(0), device=weights.device)
    blocks = weights.view(weights.size(0), -1, block)
    ends = blocks.sum(dim=-1).cumsum_(dim=-1)  # (B, blocks): cumulative weight at each block's end
    target = uniform[:, None] * ends[:, -1:]
    j = torch.searchsorted(ends, target).clamp_(max=ends.size(1) - 1)  # first block whose end reaches it
    before = torch.where(j > 0, ends.gather(1, (j - 1).clamp_(min=0)), 0.0)  # weight ahead of that block
    inside = blocks[rows, j[:, 0]].cumsum(dim=-1)  # (B, block)
    # the block's own sum may round below target - before: cap the rest at it, so the pick is a token
    # of positive weight in this block (the block reached target, so its weight is positive)
    rest = torch.minimum(target - before, inside[:, -1:])
    return (j * block + torch.searchsorted(inside, rest)).squeeze(1)


# -----------------------------------------------------------------------------


class Generated(NamedTuple):
    token: int
    mask: int  # 1 = sampled by the model, 0 = forced by the tool
    done: bool  # the row ended here (terminal token or budget spent) and has left the batch


@dataclass
class _Row:
    id: int
    budget: int  # tokens the row may still produce
    rng: torch.Generator
    steps: int = 0  # tokens produced so far, one uniform drawn for each
    forced: deque[int] = field(default_factory=deque)  # tool output still to feed in
    python: list[int] | None = None  # ids since <|python_start|>; None outside a tool call


class DecodeBatch:
    """Requests decoded together, one token per live row per step.

    Row i of the KV cache holds self.rows[i]; live rows stay packed at the front (a leaving
    row's slot takes the last row), so a step is one forward over cache rows [0, n) with no
    gather. Callers refer to rows by the ids `add` returns, which never change.
    """

    @torch.inference_mode()
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_rows: int, seq_len: int = 256):
        """Build inside the autocast context the steps will run in: the KV cache and the weights
        take its dtype. The weights are read here (cast and prepacked once per model and weights,
        see _Forward), so the batch decodes with the weights it was built with: build a new one
        after loading weights."""
        self.tokenizer = tokenizer
        c = model.config
        weight = model.lm_head.weight
        device = weight.device
        # the compute dtype: autocast's when it is on here (bf16 on GPU and on CPUs with native
        # bf16), else the weights'
        dtype = matmul_dtype(weight)
        self.cache = KVCache(max_rows, c.n_kv_head, c.head_dim, c.n_layer, seq_len, device, kv_cache_dtype(device, dtype))
        self.model = model
        self.forward = _forward_of(model, dtype)
        self.rows: list[_Row] = []
        # per-row settings, indexed like the cache; rows [len(self.rows), max_rows) are free
        self.inputs = torch.zeros(max_rows, dtype=torch.long, device=device)  # token fed in next step
        self.temperature = torch.zeros(max_rows, device=device)
        self.top_k = torch.zeros(max_rows, dtype=torch.long, device=device)  # 0 = no top-k
        self.top_p = torch.ones(max_rows, device=device)  # 1 = no nucleus cut
        self.uniforms = torch.zeros(max_rows, UNIFORM_BLOCK, device=device)
        self._next_id = 0
        special = tokenizer.encode_special
        self.terminal = set(tokenizer.answer_end_ids)
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, prompt: list[int], num_samples: int = 1, max_tokens: int | None = None,
            temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
            top_p: float | None = None) -> list[int]:
        """Prefill `prompt` once and start `num_samples` rows from it; returns their ids.

        Row i samples from its own generator seeded with seed + i, so it produces what a
        one-row request with that seed would, whatever else is in the batch.
        """
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        first = len(self.rows)
        if first + num_samples > self.cache.batch_size:
            raise ValueError(f"{num_samples} more rows do not fit: {first} of {self.cache.batch_size} in use")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        # rotary angles exist for rotary_len positions; no row may run past them
        budget = min(self.model.rotary_len - len(prompt), max_tokens or self.model.rotary_len)
        if budget < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the rotary table")
        c = self.model.config
        # the last prompt token is fed by the first step, which also yields the first sample;
        # the rest needs only its keys and values, so the prefill skips the lm_head
        prefix = KVCache(1, c.n_kv_head, c.head_dim, c.n_layer, len(prompt), self.cache.kv.device, self.cache.kv.dtype)
        if len(prompt) > 1:
            self.forward.hidden_states(torch.tensor([prompt[:-1]], device=self.inputs.device), prefix)
        rows = list(range(first, first + num_samples))
        self.cache.prefill_from(prefix, rows)
        self.inputs[rows] = prompt[-1]
        self.temperature[rows] = temperature
        self.top_k[rows] = top_k or 0
        self.top_p[rows] = 1.0 if top_p is None else top_p
        ids = []
        for i in range(num_samples):
            self.rows.append(_Row(self._next_id, budget, torch.Generator().manual_seed(seed + i)))
            ids.append(self._next_id)
            self._next_id += 1
        return ids

    @torch.inference_mode()
    def step(self) -> dict[int, Generated]:
        """Advance every row by one token. Rows that end are removed before this returns."""
        n = len(self.rows)
        if n == 0:
            return {}
        hidden = self.forward.hidden_states(self.inputs[:n, None], self.cache)[:, 0]
        logits = self.forward.logits(hidden)  # (n, vocab) fp32
        sampled = sample_next_token(logits, self.temperature[:n], self.top_k[:n], self._uniforms(),
                                    self.top_p[:n]).tolist()
        tokens, out = [], {}
        for row, token in zip(self.rows, sampled):
            forced = bool(row.forced)
            if forced:
                token = row.forced.popleft()
            row.budget -= 1
            self._use_tool(row, token)
            tokens.append(token)
            out[row.id] = Generated(token, 0 if forced else 1, token in self.terminal or row.budget == 0)
        self.inputs[:n] = torch.tensor(tokens, device=self.inputs.device)
        for row_id, generated in out.items():
            if generated.done:
                self.remove(row_id)
        return out

    @torch.inference_mode()
    def remove(self, row_id: int) -> None:
        """Drop a row (finished, or its client left); the last row moves into its slot."""
        i = next(i for i, row in enumerate(self.rows) if row.id == row_id)
        last = len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            for per_row in (self.inputs, self.temperature, self.top_k, self.top_p, self.uniforms):
                per_row[i] = per_row[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()

    def _uniforms(self) -> torch.Tensor:
        """One number in (0, 1] per row, the next from that row's own generator."""
        for i, row in enumerate(self.rows):
            if row.steps % UNIFORM_BLOCK == 0:
                # 1 - U[0, 1): a draw of exactly 0 could select a token of probability 0
                self.uniforms[i] = 1 - torch.rand(UNIFORM_BLOCK, generator=row.rng)
        columns = [row.steps % UNIFORM_BLOCK for row in self.rows]
        for row in self.rows:
            row.steps += 1
        n = len(self.rows)
        return self.uniforms[torch.arange(n), torch.tensor(columns)]

    def _use_tool(self, row: _Row, token: int) -> None:
        """The per-row tool state machine: collect the expression, queue the calculator's answer."""
        if token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            expression, row.python = self.tokenizer.decode(row.python), None
            try:
                result = calculate(expression)
            except CalculatorError:
                return  # the reference also feeds nothing back when the call fails
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python is not None:
            row.python.append(token)


class _Forward:
    """The model's forward with a KV cache (GPT.hidden_states, then GPT.logits), as the engine runs it:
    every matmul weight held in the compute dtype, cast once here instead of by autocast every step (on
    CPU, reading fp32 weights to cast them cost more than the bf16 matmuls), bf16 ones prepacked for
    oneDNN (_prepacked), and the queries', keys' and values' projections stacked into one matmul, their
    rotary and norm done in one call each: a decode step is mostly small ops. The same numbers as the
    model's own forward under the same autocast, to the bit (tests/test_engine.py). Built by
    `_forward_of`; it holds the model's tensors, not the model."""

    def __init__(self, model: GPT, dtype: torch.dtype):
        c = model.config
        self.heads = (c.n_head, c.n_kv_head, c.head_dim)
        self.wte, self.cos, self.sin = model.transformer.wte.weight, model.cos, model.sin

        def cast(*weights: torch.Tensor) -> torch.Tensor:  # the weight itself when already in dtype, unpacked
            return _prepacked((torch.cat(weights) if len(weights) > 1 else weights[0]).detach().to(dtype))
        self.layers = [(cast(b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight), cast(b.attn.c_proj.weight),
                        cast(b.mlp.c_fc.weight), cast(b.mlp.c_proj.weight)) for b in model.transformer.h]
        self.head = cast(model.lm_head.weight)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx (B, T) → final normed hidden states (B, T, n_embd), continuing rows [0, B) of cache."""
        B, T = idx.size()
        H, H_kv, D = self.heads
        positions = cache.begin(B, T)  # (B, T): every row continues from its own length
        assert cache.mask.size(-1) <= self.cos.size(1), "sequence exceeds the rotary table"
        cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        # gpt.apply_rotary as x·[cos, cos] + x with its halves swapped·[sin, -sin]: four ops instead of
        # eight, the same products and sums (a - b and a + (-b) round alike)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, -sin), dim=-1)
        x = norm(F.embedding(idx, self.wte))
        for layer, (qkv_weight, proj, fc, fc_proj) in enumerate(self.layers):
            qkv = _matmul(norm(x), qkv_weight).view(B, T, H + 2 * H_kv, D)
            qk = qkv[:, :, :H + H_kv]
            qk = norm((qk * cos + qk.roll(D // 2, dims=-1) * sin).to(qk.dtype)).transpose(1, 2)  # (B, H + H_kv, T, D)
            y = cache.attend(layer, qk[:, :H], qk[:, H:], qkv[:, :, H + H_kv:].transpose(1, 2), H != H_kv)
            x = x + _matmul(y.transpose(1, 2).reshape(B, T, -1), proj)
            x = x + _matmul(F.relu(_matmul(norm(x), fc)).square(), fc_proj)
        return norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., n_embd) → soft-capped fp32 logits (..., vocab), as GPT.logits."""
        return softcap(_matmul(hidden, self.head).float())


# one _Forward per model and dtype, kept while the model's weights stay the same: casting and prepacking
# the weights cost ~40 ms of CPU at d4 (a few decode steps), and the CLI, the chat evals and RL start a
# batch per answer. Weak keys: the cache lets a model go (its _Forward holds tensors, not the model).
_forwards: "weakref.WeakKeyDictionary[GPT, tuple[tuple, _Forward]]" = weakref.WeakKeyDictionary()


def _forward_of(model: GPT, dtype: torch.dtype) -> _Forward:
    """The model's _Forward in dtype, rebuilt when a weight was replaced or changed in place (an optimiser
    step or load_state_dict bumps the tensor's version)."""
    key = (dtype, *((p.data_ptr(), p._version) for p in model.parameters()))
    cached = _forwards.get(model)
    if cached is None or cached[0] != key:
        cached = _forwards[model] = (key, _Forward(model, dtype))
    return cached[1]


def _prepacked(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight on CPU in oneDNN's blocked layout for matmuls (a private op of torch's
    CPU inference backend), else weight itself. A plain bf16 matmul reorders the whole weight into that
    layout on every call: for the lm_head at 16 rows × 65,536 × 256 that is half its time (7.6 → 4.5 CPU
    ms on one thread, AMD EPYC with AVX-512 BF16), and the lm_head is the biggest part of a decode step."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return weight
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.ops.mkldnn._reorder_linear_weight(weight)
    except (AttributeError, RuntimeError):  # private ops: a torch build without them keeps the plain path
        pass
    return weight


def _matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight.T in weight's dtype, weight plain or _prepacked (the same products to the bit)."""
    x = x.to(weight.dtype)
    if not weight.is_mkldnn:
        return F.linear(x, weight)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), weight, None, "none", [], "")
    return y.view(*x.shape[:-1], -1)


# -----------------------------------------------------------------------------


class Engine:
    """The reference's interface: many samples of one prompt, streamed or whole."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step, one entry per sample, until every row ends.

        A row ends after yielding <|assistant_end|> or <|bos|>, or after max_tokens tokens.
        A row that ended early repeats its terminal token with mask 0 while the others go on.
        Row i is seeded with seed + i (see DecodeBatch.add).
        """
        seq_len = len(tokens) + (max_tokens or 256)
        batch = DecodeBatch(self.model, self.tokenizer, max_rows=num_samples, seq_len=seq_len)
        ids = batch.add(tokens, num_samples, max_tokens, temperature, top_k, seed)
        ended: dict[int, int] = {}  # row id → its terminal token
        while len(batch):
            out = batch.step()
            column = [out[i].token if i in out else ended[i] for i in ids]
            masks = [out[i].mask if i in out else 0 for i in ids]
            ended.update((i, g.token) for i, g in out.items() if g.done)
            yield column, masks

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Whole sequences (prompt + generated) and masks per sample; terminal tokens are left out.

        Takes generate's keyword arguments. Prompt positions have mask 0.
        """
        terminal = self.tokenizer.answer_end_ids
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                completed[i] = completed[i] or token in terminal
                if not completed[i]:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks
