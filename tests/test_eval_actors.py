"""Evaluations sharded over Ray actors give exactly the numbers of one process."""

import dataclasses
import json

import pytest
import torch

from nanochat_ray.checkpoint import checkpoint_dir, save_checkpoint
from nanochat_ray.config import ConfigError, make_config
from nanochat_ray.evals import core
from nanochat_ray.evals.actors import run_chat, run_core, start_eval_actors
from nanochat_ray.evals.evaluator import Progress, load_model
from nanochat_ray.evals.chatcore import EvalResult, chatcore, run_task_eval
from nanochat_ray.data.registry import resolve
from nanochat_ray.gpt import build_gpt
from nanochat_ray.tokenizer import Tokenizer

CFG = make_config("smoke")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An `sft` checkpoint of random (not zero-headed) weights, so predictions differ per example."""
    root = tmp_path_factory.mktemp("evals")
    torch.manual_seed(3)
    model = build_gpt(CFG.gpt_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    save_checkpoint(checkpoint_dir("sft", CFG.model_tag, root), 1, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(CFG.gpt_config())})
    return root


def test_a_missing_checkpoint_is_an_error_unless_untrained_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"no sft checkpoint of d2 in .*--allow-untrained"):
        load_model("sft", CFG, torch.device("cpu"), tmp_path)
    _, label = load_model("sft", CFG, torch.device("cpu"), tmp_path, allow_untrained=True)
    assert label.startswith("UNTRAINED")


def test_chat_eval_over_two_actors_equals_one_process(ray_cluster, root, smoke_tokenizer_dir, data_root):
    tasks = ["ARC-Easy", "MMLU", "SpellingBee"]
    actors = start_eval_actors("sft", CFG, smoke_tokenizer_dir, str(data_root), num_actors=2, root=root)
    sharded = run_chat(actors, tasks, str(data_root), max_per_task=6, max_tokens=8, temperature=1.0, seed=5)
    model, _ = load_model("sft", CFG, torch.device("cpu"), root)
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    local = {name: run_task_eval(name, model, tokenizer, range(6), data_root=str(data_root), max_tokens=8,
                                 temperature=1.0, seed=5).accuracy for name in tasks}
    assert sharded["tasks"] == local
    assert sharded["chatcore"] == pytest.approx(chatcore(local))


def test_core_over_two_actors_equals_one_process(ray_cluster, root, smoke_tokenizer_dir, data_root):
    bundle = resolve("core_eval_bundle", "all", data_root)
    tasks = [t for t in core.load_core_tasks(bundle) if t.label in ("copa", "winograd", "lambada_openai")]
    actors = start_eval_actors("sft", CFG, smoke_tokenizer_dir, str(data_root), num_actors=2, root=root)
    model, _ = load_model("sft", CFG, torch.device("cpu"), root)
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    for task in tasks:
        indices = core.select_indices(task, 6)
        shards = [actor.core.remote(task, indices[i::2]) for i, actor in enumerate(actors)]
        counts = [sum(part) for part in zip(*ray_cluster.get(shards))]
        assert tuple(counts) == core.evaluate_task(model, tokenizer, task, indices), task.label


@pytest.fixture(scope="module")
def one_actor(ray_cluster, root, smoke_tokenizer_dir, data_root):
    return start_eval_actors("sft", CFG, smoke_tokenizer_dir, str(data_root), num_actors=1, root=root)


def test_a_crashed_actor_restarts_and_its_calls_finish(ray_cluster, one_actor, root, smoke_tokenizer_dir, data_root):
    [actor] = one_actor
    ray_cluster.get(actor.describe.remote())  # model loaded
    ref = actor.chat.remote("ARC-Easy", list(range(4)))
    ray_cluster.kill(actor, no_restart=False)  # the process dies, as in an out-of-memory kill
    result = ray_cluster.get(ref, timeout=120)
    model, _ = load_model("sft", CFG, torch.device("cpu"), root)
    local = run_task_eval("ARC-Easy", model, Tokenizer.from_directory(smoke_tokenizer_dir), range(4),
                          data_root=str(data_root))
    assert result.num_total == 4 and (result.num_correct, result.predictions) == (local.num_correct, local.predictions)


def test_finished_tasks_are_kept_and_a_rerun_resumes(one_actor, data_root, tmp_path):
    path = tmp_path / "chat_sft_d2.progress.json"
    key = {"model": "sft d2 step 1", "max_per_task": 4}
    # a run that crashed after ARC-Easy finished (its counts made up, to see they are not recomputed)
    Progress(path, key).record("chat/ARC-Easy", [3, 4])
    progress = Progress(path, key)
    results = run_chat(one_actor, ["ARC-Easy", "MMLU"], str(data_root), max_per_task=4, progress=progress)
    assert results["tasks"]["ARC-Easy"] == 0.75
    saved = json.loads(path.read_text())
    assert saved["key"] == key and saved["done"]["chat/ARC-Easy"] == [3, 4] and saved["done"]["chat/MMLU"][1] == 4
    # other settings: nothing is reused
    assert Progress(path, {**key, "max_per_task": 8}).done == {}
    progress.finish()
    assert not path.exists()
