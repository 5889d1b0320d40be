"""RL (SPEC §10): rewards, advantages, the loss on sampled tokens only, rollout actors that match
the local engine, weight versions, and a real learning signal through the whole job (smoke preset,
depth 1 under its own model tag so other tests' checkpoints are left alone)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import ray
import torch

from nanochat_ray.checkpoint import build_model_from_checkpoint, checkpoint_dir, save_checkpoint
from nanochat_ray.config import ConfigError, make_config
from nanochat_ray.engine import Engine
from nanochat_ray.evals.evaluator import load_model
from nanochat_ray.gpt import build_gpt
from nanochat_ray.rl.actors import Learner, LearnerActor, RolloutActor, RolloutWorker, StaleWeightsError
from nanochat_ray.rl.driver import RLOptions, deal, question_order, rl_train, rollout_actors
from nanochat_ray.rl import policy as rl_policy
from nanochat_ray.rl.policy import (Group, group_advantages, pass_at_k, policy_batch, policy_loss_sum, question_loss,
                                    sample_groups)
from nanochat_ray.rl.tasks import GSM8KReward, SevenToy
from nanochat_ray.tasks.gsm8k import assistant_text
from nanochat_ray.tokenizer import Tokenizer
from nanochat_ray.stage import METRICS_LOG, RunOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import rl as rl_job  # noqa: E402

CFG = make_config("smoke", depth=1)  # model tag d1: this file's own checkpoints


def random_model(seed: int = 0):
    """A model whose every weight matters (the init zeroes the output projections)."""
    torch.manual_seed(seed)
    model = build_gpt(CFG.gpt_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


@pytest.fixture(scope="module")
def sft_root(artifact_root) -> Path:
    """A fresh depth-1 model saved as stage sft under the session's artifact root (what actors see)."""
    torch.manual_seed(CFG.seed)
    model = build_gpt(CFG.gpt_config())
    save_checkpoint(checkpoint_dir("sft", CFG.model_tag, artifact_root), 0, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(CFG.gpt_config())})
    return artifact_root


# -----------------------------------------------------------------------------
# plain torch


def test_gsm8k_reward_on_real_answers(data_root):
    task = GSM8KReward("test", data_root)
    for i in range(5):
        conversation = task[i]
        answer = assistant_text(conversation)
        assert task.reward(conversation, answer) == 1.0
        number = answer.split("####")[1].strip()
        assert task.reward(conversation, answer.replace(f"#### {number}", f"#### {number}1")) == 0.0
        assert task.reward(conversation, answer.split("####")[0]) == 0.0  # no final answer
    big = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "#### 1234"}]}
    assert task.reward(big, "so #### 1,234 and later #### 5") == 1.0  # commas dropped, the first #### counts
    assert task.reward(big, "#### 1234.0") == 0.0  # strings compare, as the reference's reward
    toy = SevenToy()
    assert [toy.reward(toy[0], text) for text in ("7", "it is 7.", "17", "70", "seven")] == [1, 1, 0, 0, 0]


def test_advantages_are_reward_minus_question_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards), torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, -0.75]]))


def test_pass_at_k():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(2, 1, 1) == 0.5 and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_forced_tokens_never_get_gradient(smoke_tokenizer_dir, data_root):
    # a real GSM8K answer: its calculator outputs are mask 0, like the engine's forced tokens
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    conversation = GSM8KReward("train", data_root)[0]
    ids, mask = tokenizer.render_conversation(conversation)
    assert 0 < sum(mask) < len(mask) and mask.index(1) < len(mask) - mask[::-1].index(0) - 1, "tool output expected"
    model = random_model()
    rows = [(ids, mask), (ids[:20], mask[:20])]
    inputs, targets, advantages = policy_batch([r[0] for r in rows], [r[1] for r in rows], [1.0, -1.0])
    loss_sum, valid = policy_loss_sum(model, inputs, targets, advantages)
    loss_sum.backward()
    got = [p.grad.clone() for p in model.parameters()]

    # independently: the full forward's log-probabilities, summed where the next token was sampled
    model.zero_grad()
    logprobs = model(inputs).log_softmax(-1)  # (B, T, vocab)
    expected, count = 0.0, 0
    for row, ((row_ids, row_mask), advantage) in enumerate(zip(rows, [1.0, -1.0])):
        for t in range(len(row_ids) - 1):
            if row_mask[t + 1] == 1:  # position t predicts token t + 1
                expected = expected - advantage * logprobs[row, t, row_ids[t + 1]]
                count += 1
    expected.backward()
    assert valid == count < sum(len(r[0]) - 1 for r in rows)
    torch.testing.assert_close(loss_sum, expected.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(got, (p.grad for p in model.parameters())):
        # the chunked head's soft-cap and log-softmax against the full forward's: fp32 rounding
        # leaves ~3e-6 on gradients near zero (the largest are ~1e-1)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_streamed_chunks_give_the_one_batch_gradient():
    # the learner sums unnormalised chunk losses and divides by the step's total valid tokens
    model = random_model()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 1024, (n,), generator=generator).tolist() for n in (9, 14, 6, 11)]
    masks = [[0] * 3 + [1] * (len(s) - 3) for s in sequences]
    advantages = [0.5, -0.5, 0.25, -0.25]

    def gradient(chunks):
        model.zero_grad()
        total = 0
        for chunk in chunks:
            loss, valid = policy_loss_sum(model, *policy_batch(*[[x[i] for i in chunk] for x in (sequences, masks, advantages)]))
            loss.backward()
            total += valid
        return [p.grad / total for p in model.parameters()]

    for one, two in zip(gradient([[0, 1, 2, 3]]), gradient([[0, 1], [2], [3]])):
        torch.testing.assert_close(one, two, atol=1e-7, rtol=1e-5)


def test_loss_is_normalised_per_question_as_the_reference():
    # two questions with very different numbers of sampled tokens: each counts as much as the other
    model = random_model()
    generator = torch.Generator().manual_seed(1)
    groups = [Group(torch.randint(9, 1024, (4,), generator=generator).tolist(),
                    [torch.randint(9, 1024, (n,), generator=generator).tolist() for n in lengths],
                    [[1] * n for n in lengths], rewards)
              for lengths, rewards in (([3, 5], [1.0, 0.0]), ([20, 12, 7], [0.0, 1.0, 1.0]))]

    def gradient(rows_per_pass):
        model.zero_grad()
        for group in groups:
            question_loss(model, group, rows_per_pass)
        return [p.grad / len(groups) for p in model.parameters()]

    model.zero_grad()
    expected = 0.0
    for group in groups:  # independently: −Σ advantage × logprob over the question's tokens / their count
        advantages = group_advantages(torch.tensor(group.rewards)[None])[0]
        total, count = 0.0, 0
        for tokens, advantage in zip(group.tokens, advantages):
            ids = torch.tensor([group.prompt + tokens])
            logprobs = model(ids[:, :-1]).log_softmax(-1)[0]
            for t in range(len(group.prompt) - 1, ids.size(1) - 1):
                total = total - advantage * logprobs[t, ids[0, t + 1]]
                count += 1
        expected = expected + total / count / len(groups)
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    for rows in (1, 3):  # passes change memory, not the result
        for a, b in zip(gradient(rows), want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sampled_terminal_token_is_not_a_target(smoke_tokenizer_dir):
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id
    model = random_model()
    with torch.no_grad():  # one of ±u wins whatever the hidden state: the first sample is a terminal token
        direction = torch.ones(model.config.n_embd) * 1000
        model.lm_head.weight.zero_()
        model.lm_head.weight[end], model.lm_head.weight[bos] = direction, -direction
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": ""}]})
    group = sample_groups(model, tokenizer, [prompt], [0], num_samples=3, max_tokens=4)[0]
    assert all(tokens[-1] in (end, bos) for tokens in group.tokens)
    assert all(mask[-1] == 0 for mask in group.masks)  # as the reference: never trained to emit it
    group.rewards = [1.0, 0.0, 0.0]
    model.zero_grad()
    assert question_loss(model, group, 3) == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_dealing_and_question_order():
    calls = deal(list(range(5)), [10, 20, 30, 40, 50], num_actors=2, per_call=2)
    assert calls == [(0, [0, 1], [10, 20]), (1, [3, 4], [40, 50]), (0, [2], [30])]
    assert [c[1] for c in deal(list(range(3)), [0] * 3, num_actors=4, per_call=1)] == [[0], [1], [2]]
    epoch = [i for s in range(5) for i in question_order(10, 42, s, 2)]
    assert sorted(epoch) == list(range(10))  # one epoch visits every question once
    assert question_order(10, 42, 5, 2) != question_order(10, 42, 0, 2)  # the next epoch reshuffles


# -----------------------------------------------------------------------------
# actors


@pytest.fixture(scope="module")
def actors(ray_cluster, sft_root, smoke_tokenizer_dir, data_root, tmp_path_factory):
    stage_dir = tmp_path_factory.mktemp("rl_learner")
    init = checkpoint_dir("sft", CFG.model_tag, sft_root) / "step_000000"
    learner = LearnerActor.remote(dataclasses.replace(CFG, init_lr_frac=1.0), str(stage_dir), str(init), False, {})
    worker = RolloutActor.remote(CFG, str(smoke_tokenizer_dir), str(data_root))
    yield learner, worker
    ray.kill(learner)
    ray.kill(worker)


def test_rollout_actor_matches_the_local_engine(actors, smoke_tokenizer_dir, data_root):
    _, worker = actors
    model = random_model(seed=1)
    ray.get(worker.load_weights.remote(7, model.state_dict()))
    result = ray.get(worker.rollout.remote(7, "gsm8k", "test", [3, 0], [5, 500], 3, 12))
    assert result.version == 7 and result.indices == [3, 0]
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    task = GSM8KReward("test", data_root)
    engine = Engine(model, tokenizer)
    for group, index, seed in zip(result.groups, [3, 0], [5, 500]):
        prompt = tokenizer.render_for_completion(task[index])
        assert group.prompt == prompt
        tokens, masks = [[] for _ in range(3)], [[] for _ in range(3)]
        ended = [False] * 3
        for column, mask_column in engine.generate(prompt, 3, max_tokens=12, temperature=1.0, top_k=50, seed=seed):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if not ended[i]:
                    tokens[i].append(token)
                    masks[i].append(mask)
                    ended[i] = token in (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
        assert group.tokens == tokens and group.masks == masks
        assert group.rewards == [task.reward(task[index], c) for c in group.completions(tokenizer)]


def test_weight_publish_bumps_the_version_and_actors_use_it(actors):
    learner, worker = actors
    version, [weights] = ray.get(learner.publish.remote())
    assert version == 0
    ray.get(worker.load_weights.remote(version, weights))
    ask = dict(task="toy", split="train", indices=[0, 1], seeds=[0, 100], num_samples=8, max_tokens=8)
    before = ray.get(worker.rollout.remote(0, **ask))
    assert before.version == 0
    for group in before.groups:  # a fresh model rarely earns a reward: give the update a direction
        group.rewards = [float(i == 0) for i in range(8)]
    learner.accumulate.remote(before)
    stats = ray.get(learner.step.remote(10))
    assert stats["valid_tokens"] > 0
    with pytest.raises(StaleWeightsError):  # the learner is at v1 now: v0 samples are refused
        ray.get(learner.accumulate.remote(before))
    version, [weights] = ray.get(learner.publish.remote())
    assert version == 1
    with pytest.raises(StaleWeightsError, match="v1"):  # not loaded yet: the worker refuses
        ray.get(worker.rollout.remote(1, **ask))
    assert ray.get(worker.rollout.remote(1, **ask, allow_stale=True)).version == 0
    ray.get(worker.load_weights.remote(version, weights))
    after = ray.get(worker.rollout.remote(1, **ask))
    assert after.version == 1
    assert [g.tokens for g in after.groups] != [g.tokens for g in before.groups], "same seeds, new weights"


def test_the_gpu_path_in_bf16_publishes_bf16_and_samples_in_bf16(ray_cluster, sft_root, smoke_tokenizer_dir, tmp_path):
    # what --use-gpu does by default (dtype auto = bf16 on CUDA), forced on CPU: the learner publishes
    # bf16 weights (half the bytes), the rollout samples under bf16 autocast with a bf16 head (and a bf16
    # KV cache on CUDA; on CPU the engine keeps it fp32, its faster attention there), and the learner's
    # chunked policy loss runs under the same autocast
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    init = checkpoint_dir("sft", CFG.model_tag, sft_root) / "step_000000"
    learner = Learner(cfg, str(tmp_path), str(init), False, {})
    version, [ref] = learner.publish()
    weights = ray.get(ref)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    worker = RolloutWorker(cfg, str(smoke_tokenizer_dir), None)
    worker.load_weights(version, weights)
    caches = []
    original = rl_policy.DecodeBatch.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append((self.forward.head.dtype, self.cache.kv.dtype))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rl_policy.DecodeBatch, "__init__", spy)
        result = worker.rollout(version, "toy", "train", [0, 1], [0, 100], 4, 8)
    assert caches == [(torch.bfloat16, torch.float32)]
    for group in result.groups:  # give the update a direction
        group.rewards = [float(i == 0) for i in range(4)]
    learner.accumulate(result)
    stats = learner.step(10)
    assert stats["valid_tokens"] > 0 and torch.isfinite(torch.tensor(stats["loss"]))
    assert learner.version == 1


def test_one_rollout_actor_per_gpu_the_learner_leaves_free(ray_cluster, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert rollout_actors(RLOptions(), use_gpu=True) == 7
    assert rollout_actors(RLOptions(placement="colocated"), use_gpu=True) == 8
    assert rollout_actors(RLOptions(num_rollout_actors=3), use_gpu=True) == 3
    assert rollout_actors(RLOptions(), use_gpu=False) == 1


# -----------------------------------------------------------------------------
# the job


TOY_STEPS = 16  # RL steps of the toy run (checkpoints every 4)


def job(tokenizer_dir, data_root, *flags):
    return rl_job.main(["--preset", "smoke", "--depth", "1", "--tokenizer-dir", str(tokenizer_dir),
                        "--data-root", str(data_root), *flags])


def test_rl_raises_the_reward_on_a_learnable_toy_task_and_resumes_after_failures(ray_cluster, sft_root, smoke_tokenizer_dir,
                                                                 data_root):
    flags = ["--task", "toy", "--init-lr-frac", "1.0", "--questions-per-step", "4", "--samples-per-question", "16",
             "--max-new-tokens", "12", "--warmdown-ratio", "0", "--eval-every", "0", "--save-every", "4"]
    result = job(smoke_tokenizer_dir, data_root, *flags, "--num-iterations", str(TOY_STEPS), "--fresh")
    rewards = [m["mean_reward"] for m in result["history"]]
    assert len(rewards) == TOY_STEPS
    # a fresh model rarely says "7" (it depends on the tokenizer's ids; seeds fixed): a few steps in, reward
    # comes, and by the last steps the reward is well above where it started
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert late > early + 0.3, rewards
    model, meta = build_model_from_checkpoint("rl", "d1", root=sft_root)
    assert meta["stage"] == "rl" and meta["step"] == TOY_STEPS and meta["rl"]["task"] == "toy"
    # the chat evals load the rl stage the same way (jobs/chat_eval.py --stage rl)
    assert load_model("rl", CFG, torch.device("cpu"), sft_root)[1] == f"rl d1 step {TOY_STEPS}"

    with pytest.raises(ConfigError, match="--resume"):
        job(smoke_tokenizer_dir, data_root, *flags)
    # resumes at TOY_STEPS; a rollout actor dies after the next step: every actor restarts from the checkpoint
    n = TOY_STEPS
    resumed = job(smoke_tokenizer_dir, data_root, *flags, "--num-iterations", str(n + 2), "--resume", "--fail-at-step", str(n + 1))
    assert [m["step"] for m in resumed["history"]] == [n + 1, n + 1, n + 2]
    assert resumed["history"][0]["mean_reward"] == pytest.approx(resumed["history"][1]["mean_reward"])  # redone alike
    assert resumed["checkpoint"].endswith(f"step_{n + 2:06d}")
    lines = (checkpoint_dir("rl", "d1", sft_root) / METRICS_LOG).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, n + 2)) + [n + 1, n + 2]


def test_rl_job_on_gsm8k_smoke(ray_cluster, sft_root, smoke_tokenizer_dir, data_root):
    result = job(smoke_tokenizer_dir, data_root, "--num-iterations", "2", "--eval-every", "2", "--fresh",
                 "--num-rollout-actors", "2")
    metrics = result["metrics"]
    assert metrics["step"] == 2 and 0 <= metrics["mean_reward"] <= 1
    assert [f"pass_at_{k}" in metrics for k in range(1, 9)] == [True] * 8
    assert all(0 <= metrics[f"pass_at_{k}"] <= metrics[f"pass_at_{k + 1}"] <= 1 for k in range(1, 8))
    assert metrics["rollout_tokens_per_second"] > 0 and 0 <= metrics["rollout_idle_fraction"] < 1
    assert result["checkpoint"].endswith("step_000002")
    assert result["history"][0]["step"] == 0  # pass@k of the starting weights


def test_bad_options_fail_before_any_work(sft_root, smoke_tokenizer_dir):
    with pytest.raises(ConfigError, match="samples_per_question"):
        rl_train(CFG, RLOptions(samples_per_question=0), RunOptions(tokenizer_dir=smoke_tokenizer_dir))


TOY = RLOptions(task="toy", questions_per_step=2, samples_per_question=4, max_new_tokens=8, eval_questions=2)


def test_a_learner_exception_restarts_from_the_last_rl_checkpoint(ray_cluster, sft_root, smoke_tokenizer_dir,
                                                                   data_root, capsys):
    from nanochat_ray.config import stage_defaults

    cfg = make_config("smoke", depth=1, **{**stage_defaults("rl", "smoke"), "num_iterations": 4, "save_every": 2,
                                           "eval_every": 0})
    result = rl_train(cfg, TOY, RunOptions(tokenizer_dir=smoke_tokenizer_dir, data_root=str(data_root), fresh=True,
                                           max_failures=1, artifact_root=sft_root, fail_at_step=3), fail_in="learner")
    out = capsys.readouterr().out
    assert "RuntimeError: injected learner failure in the update to step 3" in out and "failure 1 of at most 1" in out
    # step 3's update raised: nothing of it was recorded, and the restart from checkpoint 2 redid it
    assert [m["step"] for m in result["history"]] == [1, 2, 3, 4] and result["checkpoint"].endswith("step_000004")


def test_a_hung_call_is_a_clear_error_not_a_hang(ray_cluster, sft_root, smoke_tokenizer_dir, data_root, capsys):
    from nanochat_ray.rl.driver import ActorTimeoutError

    with pytest.raises(ActorTimeoutError, match="starting the learner took longer than 0.001 s.*--call-timeout-s"):
        rl_train(CFG, dataclasses.replace(TOY, call_timeout_s=0.001), RunOptions(
            tokenizer_dir=smoke_tokenizer_dir, data_root=str(data_root), fresh=True, max_failures=1, artifact_root=sft_root))
    assert "failure 1 of at most 1" in capsys.readouterr().out  # retried once, then gave up
