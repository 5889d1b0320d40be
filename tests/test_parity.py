"""
Parity with the reference nanochat (commit 01f5f10) on the outputs it produced itself, stored in
shared/parity/ (its README says how each was made and which tolerances separate noise from bugs):
the tiny GPT's logits, loss and KV-cache decode; Muon's 3-step trajectory and the optimizer groups;
chat rendering; task conversations; graders.

    NANOCHAT_DATA=../shared/data python -m pytest -q tests/test_parity.py
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat_ray.gpt import GPT, GPTConfig, KVCache
from nanochat_ray.optim import DistMuon, build_optimizers
from nanochat_ray.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="session")
def parity_dir(data_root) -> Path:
    path = Path(data_root).parent / "parity"
    if not (path / "README.md").exists():
        pytest.skip(f"no parity data beside the data mirror ({path})")
    return path


def load(parity_dir: Path, name: str):
    if name.endswith(".pt"):
        return torch.load(parity_dir / name, weights_only=True)
    return json.loads((parity_dir / name).read_text())


# -----------------------------------------------------------------------------
# tiny GPT


@pytest.fixture(scope="module")
def tiny(parity_dir):
    meta, stored = load(parity_dir, "gpt_tiny.json"), load(parity_dir, "gpt_tiny.pt")
    c = meta["config"]
    model = GPT(GPTConfig(sequence_len=c["sequence_len"], vocab_size=c["vocab_size"], n_layer=c["n_layer"],
                          n_head=c["n_head"], n_kv_head=c["n_kv_head"], n_embd=c["n_embd"]))
    model.init_weights()  # builds the rotary tables; every weight is then overwritten
    model.load_state_dict({k: v.float() for k, v in stored["state_dict"].items()})
    return model.eval(), meta, stored


def test_tiny_gpt_logits_and_loss(tiny):
    model, meta, stored = tiny
    with torch.no_grad():
        logits = model(stored["ids"])
        mean = model(stored["ids"], targets=stored["targets"])
        per_token = model(stored["ids"], targets=stored["targets"], loss_reduction="none")
    # the README's 1e-4 allows fp32 rotary tables (5e-5); ours are bf16 as the reference's, so we
    # are within fp32 reordering noise (~3e-7); zeroing c_proj moves the logits by 0.06
    torch.testing.assert_close(logits, stored["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.cos[0, :64, 0], stored["rotary_cos"], atol=0, rtol=0)
    torch.testing.assert_close(model.sin[0, :64, 0], stored["rotary_sin"], atol=0, rtol=0)
    assert abs(mean.item() - meta["loss"]["mean"]) < 1e-5
    torch.testing.assert_close(per_token.flatten(), stored["loss_none"], atol=1e-4, rtol=0)


def test_tiny_gpt_softcap_in_the_nonlinear_region(tiny):
    model, _, stored = tiny
    with torch.no_grad():
        model.lm_head.weight.mul_(16)
        try:
            logits = model(stored["ids"][:1, :8])
        finally:
            model.lm_head.weight.div_(16)
    # a missing or wrong cap moves these logits by ~2
    torch.testing.assert_close(logits[0], stored["softcap_lm_head_x16_logits_row0_pos0_7"], atol=1e-4, rtol=0)


def test_tiny_gpt_kv_cache_decode_chunk_and_greedy(tiny):
    model, meta, stored = tiny
    c = model.config
    row = stored["ids"][:1]
    with torch.no_grad():
        full = model(row)[0]
        cache = KVCache(1, c.n_kv_head, c.head_dim, c.n_layer, seq_len=48)
        prefill = model(row[:, :40], kv_cache=cache)[0, -1]
        decode = torch.stack([model(row[:, t:t + 1], kv_cache=cache)[0, -1] for t in range(40, 48)])
        chunk_cache = KVCache(1, c.n_kv_head, c.head_dim, c.n_layer, seq_len=48)
        model(row[:, :40], kv_cache=chunk_cache)
        chunk = model(row[:, 40:48], kv_cache=chunk_cache)[0]
        greedy_cache = KVCache(1, c.n_kv_head, c.head_dim, c.n_layer, seq_len=48)
        logits, greedy = model(row[:, :40], kv_cache=greedy_cache)[0, -1], []
        for _ in range(8):
            greedy.append(int(logits.argmax()))
            logits = model(torch.tensor([[greedy[-1]]]), kv_cache=greedy_cache)[0, -1]
    torch.testing.assert_close(prefill, stored["kv_prefill_logits_last"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decode, stored["kv_decode_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(chunk, stored["kv_chunk_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decode, full[40:48], atol=1e-5, rtol=0)  # our cache against our own forward
    assert greedy == meta["generate"]["greedy_engine_generate_batch"]


# -----------------------------------------------------------------------------
# optimizers


def test_muon_three_step_trajectory(parity_dir):
    meta, stored = load(parity_dir, "muon.json")["muon"], load(parity_dir, "muon.pt")
    params = [torch.nn.Parameter(p.float()) for p in stored["init"]]
    muon = DistMuon(params, lr=meta["hyper"]["lr"], momentum=meta["hyper"]["momentum"])
    for step, (grads, updates) in enumerate(zip(stored["grads"], stored["updates"])):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.float().clone()
        muon.step()
        for i, (p, b, ref, lr) in enumerate(zip(params, before, updates, meta["effective_lr"])):
            ours, ref = (b - p.detach()) / lr, ref.float()
            # README: noise (kernels, compile) stays within cosine 0.9994 / rel. Frobenius 0.032;
            # nesterov off, 4 NS steps or momentum 0.9 fall outside from step 2 on
            cosine = F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item()
            relative = ((ours - ref).norm() / ref.norm()).item()
            assert cosine >= 0.999 and relative <= 0.04, f"step {step + 1} param {i}: cos {cosine}, rel {relative}"
            assert abs(ours.norm() / ref.norm() - 1) < 0.01, f"step {step + 1} param {i}: effective lr differs"


def test_optimizer_groups_and_learning_rates(parity_dir, tiny):
    model, _, _ = tiny
    table = load(parity_dir, "muon.json")["setup_optimizers"]
    names = {id(p): n for n, p in model.named_parameters()}
    ours = build_optimizers(model)
    for opt, ref in zip(ours, table["optimizers"]):
        ref_groups = {name: group for group in ref["groups"] for name in group["params"]}
        for group in opt.param_groups:
            for p in group["params"]:
                want = ref_groups.pop(names[id(p)])
                assert group["lr"] == pytest.approx(want["lr"], rel=1e-12)
                assert group["initial_lr"] == pytest.approx(want["initial_lr"], rel=1e-12)
                for key in ("betas", "eps", "weight_decay", "momentum", "nesterov", "ns_steps"):
                    if key in want:
                        assert tuple(group[key]) == tuple(want[key]) if key == "betas" else group[key] == want[key]
        assert not ref_groups, f"parameters the reference puts in {ref['class']} but we do not: {list(ref_groups)}"


# -----------------------------------------------------------------------------
# tasks, rendering, graders


def task_for(key: str, data_root):
    """Our task for a tasks.json key (the SmolTalk entry is checked separately: its split differs)."""
    from nanochat_ray.tasks import ARC, GSM8K, MMLU, HumanEval, SimpleSpelling, SpellingBee
    name, *rest = key.split("/")
    if name == "ARC":
        return ARC(rest[0], rest[1], data_root)
    if name == "MMLU":
        return MMLU(rest[1], data_root)
    if name == "GSM8K":
        return GSM8K(rest[1], data_root)
    if name == "HumanEval":
        return HumanEval(data_root)
    return {"SpellingBee": SpellingBee, "SimpleSpelling": SimpleSpelling}[name](1000, rest[0], data_root)


def same_conversation(ours: dict, reference: dict) -> None:
    """Every field the reference gives equals ours (we may carry more, e.g. HumanEval's task_id)."""
    for key, value in reference.items():
        assert ours.get(key) == value, f"{key}: ours {ours.get(key)!r}\nreference {value!r}"


def test_task_conversations_equal_the_reference(parity_dir, data_root):
    stored = load(parity_dir, "tasks.json")
    for key, entry in stored["tasks"].items():
        if key.startswith("SmolTalk"):
            continue
        task = task_for(key, data_root)
        assert len(task) == entry["len"], key
        assert task.eval_type == entry["eval_type"], key
        for example in entry["examples"]:
            conversation = task[example["index"]]
            same_conversation(conversation, example["conversation"])
            if "letters_evaluated_correct" in example:
                correct = [letter for letter in conversation["letters"] if task.evaluate(conversation, letter)]
                assert correct == example["letters_evaluated_correct"], key


def test_smoltalk_is_shuffled_like_the_reference(parity_dir, data_root):
    from nanochat_ray.data.registry import read_records
    from nanochat_ray.tasks import SmolTalk
    from nanochat_ray.tasks.base import shuffled
    from nanochat_ray.tasks.conversations import HOLDOUT_EVERY
    entry = next(v for k, v in load(parity_dir, "tasks.json")["tasks"].items() if k.startswith("SmolTalk"))
    rows = read_records(Path(data_root) / "sft" / "sft_messages.jsonl")
    order = shuffled(rows)
    assert len(order) == entry["len"]
    for example in entry["examples"]:
        assert order[example["index"]]["messages"] == example["conversation"]["messages"]
        assert rows[example["source_row"]]["messages"] == example["conversation"]["messages"]
    # the stand-in's held-out "test" rows are every 20th of that order; "train" starts with the rest
    assert SmolTalk("test", data_root)[0]["messages"] == order[0]["messages"]
    assert SmolTalk("train", data_root)[0]["messages"] == order[1]["messages"]
    assert HOLDOUT_EVERY > 1


def test_slicing_and_mixture_order(parity_dir, data_root):
    from nanochat_ray.tasks import GSM8K, SimpleSpelling, SpellingBee, TaskMixture
    stored = load(parity_dir, "tasks.json")
    sliced = GSM8K("test", data_root, start=2, stop=12, step=3)
    assert len(sliced) == stored["task_slicing"]["len"]
    prefixes = [sliced[i]["messages"][0]["content"][:40] for i in range(len(sliced))]
    assert prefixes == stored["task_slicing"]["first_user_message_prefixes"]
    mixture = TaskMixture([SimpleSpelling(3, "train", data_root), SpellingBee(5, "train", data_root),
                           SimpleSpelling(2, "test", data_root)], seed=42)
    firsts = [mixture[i]["messages"][0]["content"] for i in range(len(mixture))]
    assert firsts == stored["task_mixture"]["first_user_messages"]


def test_multiple_choice_render(parity_dir):
    from nanochat_ray.tasks.multiple_choice import render_mc
    for case in load(parity_dir, "tasks.json")["render_mc"]:
        assert render_mc(case["question"], case["letters"], case["choices"]) == case["rendered"]


def segments(tok, ids: list[int], mask: list[int] | None) -> list[dict]:
    """The parity README's text-level view: maximal runs of equal (mask, is-special), decoded."""
    special_ids = {tok.encode_special(name) for name in SPECIAL_TOKENS}
    keys = [(m, i in special_ids) for i, m in zip(ids, mask or [None] * len(ids))]
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or keys[end] != keys[start]:
            run = {"text": tok.decode(ids[start:end]), "special": keys[start][1]}
            runs.append(run if mask is None else run | {"mask": keys[start][0]})
            start = end
    return runs


def test_render_equals_the_reference_at_text_level(parity_dir, smoke_tokenizer_dir):
    from nanochat_ray.tokenizer import Tokenizer
    stored = load(parity_dir, "render.json")
    tok = Tokenizer.from_directory(smoke_tokenizer_dir)
    assert list(SPECIAL_TOKENS) == [t["name"] for t in stored["special_tokens"]] and stored["bos_token"] == "<|bos|>"
    # ids are tokenizer-specific (ours are 0..8, the reference's follow its BPE ranks): compare text
    for case in stored["cases"]:
        ids, mask = tok.render_conversation(case["conversation"])
        want = [{k: s[k] for k in ("text", "special", "mask")} for s in case["segments"]]
        assert segments(tok, ids, mask) == want, case["name"]
        if "render_for_completion" in case:
            want = [{k: s[k] for k in ("text", "special")} for s in case["render_for_completion"]["segments"]]
            assert segments(tok, tok.render_for_completion(case["conversation"]), None) == want, case["name"]


def test_gsm8k_grader_equals_the_reference(parity_dir, data_root):
    from nanochat_ray.rl.tasks import load_reward_task
    from nanochat_ray.tasks import GSM8K, SpellingBee, extract_answer
    stored = load(parity_dir, "graders.json")["gsm8k"]
    task, reward_task = GSM8K("test", data_root), load_reward_task("gsm8k", "test", data_root)
    bee = SpellingBee(1, data_root=data_root)
    for item in stored["items"].values():
        assert task[item["shuffled_index"]]["messages"][0]["content"] == item["question"]
    for case in stored["cases"]:
        conversation = task[case["item_index"]]
        assert extract_answer(case["completion"]) == case["extract_answer"], case["case"]
        assert int(task.evaluate(conversation, case["completion"])) == case["evaluate"], case["case"]
        assert reward_task.reward(conversation, case["completion"]) == case["reward"], case["case"]
        # SpellingBee grades "#### N" the same way
        assert bee.evaluate({"messages": [conversation["messages"][-1]]}, case["completion"]) == bool(case["evaluate"])


def test_humaneval_program_and_outcomes_equal_the_reference(parity_dir, data_root):
    from nanochat_ray.evals.sandbox import run_program
    from nanochat_ray.tasks import HumanEval, extract_code, humaneval_program
    stored = load(parity_dir, "graders.json")["humaneval"]
    task = HumanEval(data_root, run_program=lambda code: run_program(code, timeout=2.0, memory_mb=256).success)
    items = {name: task[item["shuffled_index"]] for name, item in stored["items"].items()}
    for name, item in stored["items"].items():
        assert items[name]["entry_point"] == item["entry_point"]
    for case in stored["cases"]:
        conversation = items[case["item"]]
        assert extract_code(case["completion"]) == case["extracted_program"], case["case"]
        assert humaneval_program(conversation, case["completion"]) == case["program"], case["case"]
        result = run_program(case["program"], timeout=2.0, memory_mb=256)
        assert result.success == case["success"], f"{case['case']}: {result}"
        assert (result.status == "timeout") == case["execution"]["timeout"], case["case"]
        assert task.evaluate(conversation, case["completion"]) == case["success"], case["case"]


def test_chat_eval_subsets_are_the_reference_ones(parity_dir, data_root):
    # an eval of N problems takes the first N of the shuffled task, as the reference: the same problems
    from nanochat_ray.evals.chatcore import BASELINES, load_eval_task
    stored = load(parity_dir, "tasks.json")["tasks"]
    keys = {"ARC-Easy": "ARC/ARC-Easy/test", "ARC-Challenge": "ARC/ARC-Challenge/test", "MMLU": "MMLU/all/test",
            "GSM8K": "GSM8K/main/test", "HumanEval": "HumanEval/test", "SpellingBee": "SpellingBee/test"}
    assert set(keys) == set(BASELINES)
    for name, key in keys.items():
        task = load_eval_task(name, data_root)
        for example in stored[key]["examples"]:
            same_conversation(task[example["index"]], example["conversation"])
