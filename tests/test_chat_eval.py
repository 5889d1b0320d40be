"""Chat evaluation (SPEC §8): letter choice among the offered letters, pass@k sampling, sharding, ChatCORE."""

import pytest
import torch
from torch import nn

from nanochat_ray.evals.chatcore import (
    EvalResult, chatcore, evaluate_categorical, evaluate_generative, letter_token_ids, load_eval_task,
    engine_generate, run_task_eval,
)
from nanochat_ray.gpt import GPT, GPTConfig, build_gpt
from nanochat_ray.tasks import ARC, GSM8K, MMLU
from nanochat_ray.tasks.gsm8k import assistant_text
from nanochat_ray.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smoke_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_directory(smoke_tokenizer_dir)


class TokenTableModel(nn.Module):
    """Next-token logits that depend only on the current token: a (vocab, vocab) lookup table."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        nn.init.zeros_(self.table.weight)

    # the GPT interface the categorical eval uses: hidden states, then the head at chosen positions
    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)  # (B, T, vocab): here the "hidden state" is already the logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float()


@pytest.fixture(scope="module")
def prefers_e_then_b(tok) -> TokenTableModel:
    """After <|assistant_start|> the logits favour E strongly, then B; after the padding token
    (bos) they favour C even more, so reading a padded position would show up as C."""
    model = TokenTableModel(tok.vocab_size)
    e, b, c = letter_token_ids(tok, ["E", "B", "C"])
    with torch.no_grad():
        model.table.weight[tok.encode_special("<|assistant_start|>"), e] = 10.0
        model.table.weight[tok.encode_special("<|assistant_start|>"), b] = 5.0
        model.table.weight[tok.bos_token_id, c] = 20.0
    return model


# -----------------------------------------------------------------------------
# categorical


def test_only_offered_letters_compete(prefers_e_then_b, tok, data_root):
    mmlu = MMLU("dev", data_root)
    indices = list(range(12))
    lengths = {len(tok.render_for_completion(mmlu[i])) for i in indices}
    assert len(lengths) > 1  # the batch really is padded
    result = evaluate_categorical(mmlu, indices, prefers_e_then_b, tok, batch_size=4)
    assert result.predictions == {i: "B" for i in indices}  # E is not offered: B wins
    assert result.num_total == 12
    assert result.num_correct == sum(mmlu[i]["messages"][1]["content"] == "B" for i in indices)

    arc = ARC("ARC-Easy", "validation", data_root)
    five = next(i for i in range(len(arc)) if len(arc[i]["letters"]) == 5)
    three = next(i for i in range(len(arc)) if len(arc[i]["letters"]) == 3)
    result = evaluate_categorical(arc, [five, three, 0], prefers_e_then_b, tok, batch_size=3)
    assert result.predictions == {five: "E", three: "B", 0: "B"}  # E only where it is offered


def test_letters_are_single_tokens(tok):
    ids = letter_token_ids(tok, list("ABCDE"))
    assert len(set(ids)) == 5 and all(tok.decode([i]) == letter for i, letter in zip(ids, "ABCDE"))
    with pytest.raises(ValueError, match="one token"):
        letter_token_ids(tok, ["A", "zebra crossing"])


def test_categorical_shards_add_up(prefers_e_then_b, tok, data_root):
    indices = list(range(30))
    whole = run_task_eval("ARC-Easy", prefers_e_then_b, tok, indices, data_root=data_root, batch_size=8)
    halves = [run_task_eval("ARC-Easy", prefers_e_then_b, tok, part, data_root=data_root, batch_size=8)
              for part in (indices[:13], indices[13:])]
    total = sum(halves, EvalResult())
    assert (total.num_correct, total.num_total, total.predictions) == (whole.num_correct, 30, whole.predictions)
    assert 0 < whole.num_correct < 30
    with pytest.raises(ValueError, match="overlap"):
        halves[0] + halves[0]


# -----------------------------------------------------------------------------
# generative


def oracle(tok: Tokenizer, task, indices, wrong_first: int = 0):
    """A Generate that answers each prompt with its reference text, after `wrong_first` wrong samples."""
    answers = {tuple(tok.render_for_completion(task[i])): assistant_text(task[i]) for i in indices}
    end = tok.encode_special("<|assistant_end|>")

    def generate(prompt_ids, num_samples, max_tokens, temperature, top_k, seed):
        samples = [tok.encode("I think\n#### -1")] * wrong_first + [tok.encode(answers[tuple(prompt_ids)]) + [end]]
        return samples[:num_samples]

    return generate


def test_generative_scores_with_the_task(tok, data_root):
    gsm8k = GSM8K("test", data_root)
    indices = [0, 1, 2, 3]
    result = evaluate_generative(gsm8k, indices, tok, oracle(tok, gsm8k, indices), max_tokens=64)
    assert (result.num_correct, result.num_total) == (4, 4)
    assert result.predictions[0][0].endswith(assistant_text(gsm8k[0])[-8:])  # cut before <|assistant_end|>
    # pass@k: only the third sample is right
    late = oracle(tok, gsm8k, indices, wrong_first=2)
    assert evaluate_generative(gsm8k, indices, tok, late, num_samples=1).num_correct == 0
    assert evaluate_generative(gsm8k, indices, tok, late, num_samples=3).num_correct == 4


def test_humaneval_through_a_sandbox_callable(tok, data_root):
    def run_in_process(program: str) -> bool:  # stand-in for the sandbox: only our own reference code runs
        try:
            exec(program, {})
            return True
        except AssertionError:
            return False

    task = load_eval_task("HumanEval", data_root, run_program=run_in_process)
    indices = [0, 1, 2]
    result = run_task_eval("HumanEval", None, tok, indices, data_root=data_root, run_program=run_in_process,
                           generate=oracle(tok, task, indices))
    assert (result.num_correct, result.num_total) == (3, 3)


@pytest.fixture(scope="module")
def random_gpt(tok) -> GPT:
    """A tiny GPT with random weights everywhere (the real init zeroes the output layers)."""
    torch.manual_seed(0)
    model = build_gpt(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                                n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model.eval()


def test_engine_generate_is_seeded(random_gpt, tok):
    generate = engine_generate(random_gpt, tok)
    prompt = tok.encode("hello", prepend="<|bos|>")
    a = generate(prompt, 3, 12, 1.0, 50, seed=7)
    assert a == generate(prompt, 3, 12, 1.0, 50, seed=7) and a != generate(prompt, 3, 12, 1.0, 50, seed=8)
    assert len(a) == 3 and all(len(s) <= 12 for s in a)
    greedy = generate(prompt, 2, 12, 0.0, 50, seed=1)
    assert greedy[0] == greedy[1]


def test_generative_shards_add_up(random_gpt, tok, data_root):
    # sampled (temperature 1) completions, seeded per example: sharding changes nothing
    kwargs = dict(data_root=data_root, num_samples=2, max_tokens=6, temperature=1.0, top_k=20, seed=3)
    whole = run_task_eval("SpellingBee", random_gpt, tok, range(6), **kwargs)
    halves = [run_task_eval("SpellingBee", random_gpt, tok, part, **kwargs) for part in ([0, 2, 4], [1, 3, 5])]
    total = sum(halves, EvalResult())
    assert (total.num_correct, total.num_total, total.predictions) == (whole.num_correct, 6, whole.predictions)
    assert all(len(samples) == 2 for samples in whole.predictions.values())


def test_real_gpt_runs_both_kinds(tok, data_root):
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = build_gpt(config)
    mc = run_task_eval("MMLU", model, tok, range(3), data_root=data_root)
    assert mc.num_total == 3 and set(mc.predictions.values()) <= set("ABCD")
    gen = run_task_eval("GSM8K", model, tok, [0], data_root=data_root, max_tokens=3)
    assert gen.num_total == 1 and isinstance(gen.predictions[0][0], str)


# -----------------------------------------------------------------------------


def test_chatcore():
    assert chatcore({"ARC-Easy": 0.25, "MMLU": 1.0, "GSM8K": 0.5}) == pytest.approx((0.0 + 1.0 + 0.5) / 3)
    assert chatcore({"ARC-Challenge": 0.4, "HumanEval": 0.1, "SpellingBee": 0.7}) == pytest.approx((0.2 + 0.1 + 0.7) / 3)
    assert chatcore({"MMLU": 0.0}) == pytest.approx(-1 / 3)  # below chance is negative
    with pytest.raises(ValueError, match="no ChatCORE baseline"):
        chatcore({"HellaSwag": 0.5})
    with pytest.raises(ValueError, match="at least one"):
        chatcore({})
