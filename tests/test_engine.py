"""The engine: cached decoding equals recomputation, seeding, sampling, tool use, continuous batching."""

import pytest
import torch

from nanochat_ray.engine import DecodeBatch, Engine, sample_next_token
from nanochat_ray.gpt import GPT, GPTConfig, KVCache, build_gpt
from nanochat_ray.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog while 12 + 30 = 42 and strawberries are red. " * 4


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT], vocab_size=300)  # milliseconds


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = build_gpt(config)
    # the init zeroes every output projection; random weights make every position matter
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def prompt_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, tokenizer.encode_special("<|user_start|>"), *tokenizer.encode(text),
            tokenizer.encode_special("<|user_end|>"), tokenizer.encode_special("<|assistant_start|>")]


def terminal(tokenizer: Tokenizer) -> set[int]:
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}


def bigram_model(tokenizer: Tokenizer, next_token: dict[int, dict[int, float]]) -> GPT:
    """A GPT whose next-token logits depend only on the current token: next_token[a] = {b: logit}.

    The init zeroes every block's output projection, so each block is the identity and the
    model reduces to norm(wte[a]) @ lm_head.T: give token a its own basis vector and write its
    successors' logits into that column of the lm_head.
    """
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = build_gpt(config)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        for dim, (a, successors) in enumerate(next_token.items()):
            model.transformer.wte.weight[a, dim] = 1.0  # after the RMSNorm: sqrt(32) in that dim
            for b, logit in successors.items():
                model.lm_head.weight[b, dim] = logit / 32**0.5
    return model


# -----------------------------------------------------------------------------
# sampling


def test_inverse_cdf_sampling_follows_the_distribution_and_top_k():
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    uniform = (torch.arange(2000) + 1) / 2000  # an even sweep of (0, 1]
    ones = torch.ones(2000)

    def frequencies(top_k: int) -> torch.Tensor:
        # sample_next_token overwrites its logits: a fresh copy each time
        tokens = sample_next_token(row.repeat(2000, 1), ones, torch.full((2000,), top_k), uniform)
        return torch.bincount(tokens, minlength=4) / 2000

    torch.testing.assert_close(frequencies(0), row.softmax(-1), atol=2e-3, rtol=0)
    torch.testing.assert_close(frequencies(2), torch.tensor([2.0, 1.0, -1e9, -1e9]).softmax(-1), atol=2e-3, rtol=0)
    # temperature 0 is the argmax whatever the uniform; settings are per row
    mixed = sample_next_token(row.repeat(2, 1), torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    assert mixed.tolist() == [0, 0]


def test_sampling_by_blocks_over_a_large_vocabulary():
    # 4,096 tokens scan as 64 blocks of 64: the first maximum wins across and within blocks, and the
    # inverse CDF lands on tokens of positive weight only, in proportion to it, whichever block they are in
    logits = torch.full((3, 4096), -5.0)
    logits[0, [70, 71, 4000]] = 3.0  # tied maxima, two in one block: the first one
    logits[1, [4095, 64]] = 3.0  # the first maximum opens a block
    logits[2, 130] = 3.0
    greedy = sample_next_token(logits.clone(), torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3))
    assert greedy.tolist() == [70, 64, 130]
    row = torch.full((4096,), float("-inf"))
    row[[0, 63, 64, 2047, 4095]] = torch.tensor([0.0, 1.0, 0.5, 2.0, -1.0])  # every other token weighs 0
    uniform = (torch.arange(4000) + 1) / 4000
    tokens = sample_next_token(row.repeat(4000, 1), torch.ones(4000), torch.zeros(4000, dtype=torch.long), uniform)
    assert set(tokens.tolist()) == {0, 63, 64, 2047, 4095}
    frequencies = torch.bincount(tokens, minlength=4096)[[0, 63, 64, 2047, 4095]] / 4000
    torch.testing.assert_close(frequencies, row[[0, 63, 64, 2047, 4095]].softmax(-1), atol=1e-3, rtol=0)


def test_top_p_keeps_the_smallest_nucleus_reaching_p_per_row():
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])  # probabilities ≈ .644 .237 .087 .032
    uniform = (torch.arange(2000) + 1) / 2000
    ones, no_k = torch.ones(2000), torch.zeros(2000, dtype=torch.long)

    def frequencies(top_p: float) -> torch.Tensor:
        tokens = sample_next_token(row.repeat(2000, 1), ones, no_k, uniform, torch.full((2000,), top_p))
        return torch.bincount(tokens, minlength=4) / 2000

    torch.testing.assert_close(frequencies(0.8), torch.tensor([2.0, 1.0, -1e9, -1e9]).softmax(-1), atol=2e-3, rtol=0)
    torch.testing.assert_close(frequencies(0.9), torch.tensor([2.0, 1.0, 0.0, -1e9]).softmax(-1), atol=2e-3, rtol=0)
    assert frequencies(0.01).tolist() == [1, 0, 0, 0]  # the most likely token always stays
    torch.testing.assert_close(frequencies(1.0), row.softmax(-1), atol=2e-3, rtol=0)
    # per row: a cut in one row leaves the other alone
    both = sample_next_token(row.repeat(2, 1), torch.ones(2), torch.zeros(2, dtype=torch.long),
                             torch.tensor([0.99, 0.99]), torch.tensor([0.5, 1.0]))
    assert both.tolist() == [0, 3]


# -----------------------------------------------------------------------------
# decoding


def test_greedy_with_cache_equals_recomputing_the_full_sequence(model, tokenizer):
    prompt = prompt_of(tokenizer, "the lazy dog")
    (cached,), _ = Engine(model, tokenizer).generate_batch(prompt, temperature=0.0, max_tokens=20)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
            if token in terminal(tokenizer):
                break
            ids.append(token)
    assert len(ids) > len(prompt) + 5, "the test model should generate more than a few tokens"
    assert cached == ids


@pytest.mark.parametrize("bf16", [True, False])
def test_the_engine_forward_gives_the_model_numbers_to_the_bit(model, tokenizer, bf16):
    # CUDA and CPUs with native bf16 decode under bf16 autocast; the batch casts the weights once (and
    # prepacks them for oneDNN on CPU). On CPU the cache stays fp32: torch's CPU attention is faster in
    # fp32 than in bf16
    prompt = prompt_of(tokenizer, "the lazy dog")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.inference_mode():
        batch = DecodeBatch(model, tokenizer, max_rows=2)
        assert batch.forward.head.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert batch.cache.kv.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
        # stacked q/k/v, rotary in four ops, weights cast once: the model's own numbers, a prefill and
        # a decode step of two rows of different lengths
        ours, theirs = (KVCache(2, model.config.n_kv_head, model.config.head_dim, model.config.n_layer, 32)
                        for _ in range(2))
        for cache in (ours, theirs):
            cache.pos[1] = 3
        ids = torch.tensor([prompt[:7], prompt[3:10]])
        assert torch.equal(batch.forward.hidden_states(ids, ours), model.hidden_states(ids, kv_cache=theirs))
        step = torch.tensor([[prompt[7]], [prompt[10]]])
        hidden = batch.forward.hidden_states(step, ours)
        assert torch.equal(hidden, model.hidden_states(step, kv_cache=theirs))
        assert torch.equal(batch.forward.logits(hidden), model.logits(hidden))
        batch.add(prompt, num_samples=2, temperature=0.0)
        first = [g.token for g in batch.step().values()]
        want = model(torch.tensor([prompt]))[0, -1].argmax().item()
    assert first == [want, want]


def test_batches_share_the_cast_weights_until_the_model_changes(model, tokenizer):
    hidden = torch.randn(2, model.config.n_embd)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        first = DecodeBatch(model, tokenizer, max_rows=1).forward
        assert DecodeBatch(model, tokenizer, max_rows=3).forward is first
        with torch.no_grad():
            model.lm_head.weight.mul_(2)  # in place, as an optimiser step or load_state_dict
        try:
            second = DecodeBatch(model, tokenizer, max_rows=1).forward
            assert second is not first and torch.equal(second.logits(hidden), model.logits(hidden))
        finally:
            with torch.no_grad():
                model.lm_head.weight.div_(2)
    assert DecodeBatch(model, tokenizer, max_rows=1).forward.head.dtype == torch.float32  # fp32: its own


def test_samples_of_one_prefill_equal_separate_runs_seeded_seed_plus_row(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "strawberries")
    together, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    alone = [engine.generate_batch(prompt, max_tokens=16, temperature=1.0, seed=7 + i)[0][0] for i in range(4)]
    assert together == alone
    assert len({tuple(row) for row in together}) > 1, "rows with different seeds should differ"
    assert all(m == [0] * len(prompt) + [1] * (len(r) - len(prompt)) for m, r in zip(masks, together))
    # the same seed again gives the same samples
    assert engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=7)[0] == together


def test_temperature_zero_is_deterministic_and_top_k_one_is_greedy(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "quick brown")
    greedy, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=0.0, seed=1)
    assert greedy[0] == greedy[1] == greedy[2]
    assert engine.generate_batch(prompt, max_tokens=12, temperature=0.0, seed=99)[0][0] == greedy[0]
    top1, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.5, top_k=1, seed=5)
    assert top1 == greedy


def test_rows_of_different_lengths_decode_together_as_they_would_alone(model, tokenizer):
    prompts = [prompt_of(tokenizer, "red"), prompt_of(tokenizer, "the quick brown fox jumps over 12 dogs"),
               prompt_of(tokenizer, "42 = 12 + 30")]

    def alone(prompt: list[int], steps: int) -> list[int]:
        batch = DecodeBatch(model, tokenizer, max_rows=1)
        row = batch.add(prompt, temperature=0.0)[0]
        return [batch.step()[row].token for _ in range(steps)]

    batch = DecodeBatch(model, tokenizer, max_rows=2, seq_len=8)  # small: the cache must grow
    a, b = batch.add(prompts[0], temperature=0.0)[0], batch.add(prompts[1], temperature=0.0)[0]
    got = {a: [], b: []}
    for step in range(10):
        if step == 4:  # a request leaves mid-stream and another takes its slot
            batch.remove(a)
            c = batch.add(prompts[2], temperature=0.0)[0]
            got[c] = []
        for row, generated in batch.step().items():
            assert not generated.done, "the test model should not end these rows early"
            got[row].append(generated.token)
    assert got[a] == alone(prompts[0], 4)
    assert got[b] == alone(prompts[1], 10)
    assert got[c] == alone(prompts[2], 6)


def test_bad_requests_are_refused_and_an_empty_batch_steps_to_nothing(model, tokenizer):
    batch = DecodeBatch(model, tokenizer, max_rows=2)
    assert batch.step() == {}
    for prompt, kwargs, message in [([], {}, "at least one token"), ([1, 2], {"max_tokens": 0}, "at least 1"),
                                    ([1] * model.rotary_len, {}, "no room")]:
        with pytest.raises(ValueError, match=message):
            batch.add(prompt, **kwargs)
    batch.add([1, 2, 3], num_samples=2)
    with pytest.raises(ValueError, match="do not fit"):
        batch.add([1, 2, 3])


# -----------------------------------------------------------------------------
# ending rows and tool use


def test_rows_stop_at_assistant_end_and_max_tokens(tokenizer):
    start, end = tokenizer.encode_special("<|assistant_start|>"), tokenizer.encode_special("<|assistant_end|>")
    x, y = tokenizer.encode("x")[0], tokenizer.encode("y")[0]
    # after <|assistant_start|> a coin flip between ending and "x"; "x" then always ends
    model = bigram_model(tokenizer, {start: {end: 30.0, x: 30.0}, x: {end: 30.0}, y: {y: 30.0}})
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "hi")
    steps = list(engine.generate(prompt, num_samples=8, temperature=1.0, seed=3))
    assert len(steps) == 2, "every row has ended by the second step"
    first, second = steps
    assert set(first[0]) == {end, x}
    for token, (token2, mask2) in zip(first[0], zip(*second)):
        # a row that ended repeats its terminal token, with mask 0
        assert (token2, mask2) == ((end, 0) if token == end else (end, 1))
    results, _ = engine.generate_batch(prompt, num_samples=8, temperature=1.0, seed=3)
    assert {tuple(r[len(prompt):]) for r in results} == {(), (x,)}, "the terminal token is left out"
    # a row that never ends stops at max_tokens
    (looping,), _ = engine.generate_batch([start, y], max_tokens=5)
    assert looping == [start, y] + [y] * 5


def test_tool_call_result_is_forced_into_the_stream_with_mask_zero(tokenizer):
    special = tokenizer.encode_special
    start, end = special("<|assistant_start|>"), special("<|assistant_end|>")
    py_start, py_end, out_end = special("<|python_start|>"), special("<|python_end|>"), special("<|output_end|>")
    expression = tokenizer.encode("2+3")
    # the model writes <|python_start|> 2+3 <|python_end|>, and ends once the tool has answered
    script = [start, py_start, *expression, py_end]
    model = bigram_model(tokenizer, {a: {b: 30.0} for a, b in zip(script, script[1:])} | {out_end: {end: 30.0}})
    prompt = prompt_of(tokenizer, "what is 2+3?")
    (result,), (mask,) = Engine(model, tokenizer).generate_batch(prompt, temperature=0.0, max_tokens=30)
    forced = [special("<|output_start|>"), *tokenizer.encode("5"), out_end]
    assert result == prompt + [py_start, *expression, py_end] + forced
    assert mask == [0] * len(prompt) + [1] * (len(expression) + 2) + [0] * len(forced)


def test_failed_tool_call_forces_nothing(tokenizer):
    special = tokenizer.encode_special
    start, end = special("<|assistant_start|>"), special("<|assistant_end|>")
    py_start, py_end = special("<|python_start|>"), special("<|python_end|>")
    expression = tokenizer.encode("2+")  # a syntax error
    script = [start, py_start, *expression, py_end, end]
    model = bigram_model(tokenizer, {a: {b: 30.0} for a, b in zip(script, script[1:])})
    (result,), (mask,) = Engine(model, tokenizer).generate_batch([start], temperature=0.0, max_tokens=30)
    assert result == script[:-1] and mask == [0] + [1] * (len(script) - 2)
