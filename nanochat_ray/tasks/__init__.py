"""
Tasks: datasets as lists of conversations for midtraining, SFT and chat evaluation (SPEC §7-§9).

    task = GSM8K("train", data_root="shared/data")
    task[0]                             # {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    task.evaluate(task[0], completion)  # evaluation tasks: True / False
    identity = Identity("shared/data")
    mix = TaskMixture([SmolTalk("train", "shared/data"), identity, identity], seed=42)  # identity ×2

Every file comes through data/registry.py (the offline mirror, else the hub).

Run by: python jobs/midtrain.py, jobs/sft.py, jobs/chat_eval.py; tested by python -m pytest tests/test_tasks.py.
"""

from nanochat_ray.tasks.base import CustomJSON, Task, TaskMixture, validate_conversation
from nanochat_ray.tasks.conversations import Identity, SmolTalk
from nanochat_ray.tasks.gsm8k import GSM8K, extract_answer
from nanochat_ray.tasks.humaneval import HumanEval, extract_code, humaneval_program
from nanochat_ray.tasks.multiple_choice import ARC, MMLU
from nanochat_ray.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC", "GSM8K", "MMLU", "CustomJSON", "HumanEval", "Identity", "SimpleSpelling", "SmolTalk",
    "SpellingBee", "Task", "TaskMixture", "extract_answer", "extract_code", "humaneval_program",
    "validate_conversation",
]
