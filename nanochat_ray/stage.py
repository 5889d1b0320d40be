"""
What every training stage shares, Ray-free: the fixed prompts whose greedy continuations show
how a model is doing. The TorchTrainer stages (train/) and the evaluations use it.

    print(greedy_samples(model, tokenizer, [tokenizer.encode(p, prepend="<|bos|>") for p in SAMPLE_PROMPTS]))

Run by python jobs/pretrain.py, jobs/midtrain.py, jobs/sft.py, jobs/base_eval.py.
"""

from nanochat_ray.engine import Engine
from nanochat_ray.gpt import GPT
from nanochat_ray.tokenizer import Tokenizer

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]
SAMPLE_QUESTIONS = ["What is the capital of France?", "Who are you?", "How many r are in strawberry?"]


def greedy_samples(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], max_tokens: int = 16) -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded; it stops early at the end of an answer."""
    engine = Engine(model, tokenizer)
    return [tokenizer.decode(engine.generate_batch(ids, max_tokens=max_tokens, temperature=0.0)[0][0][len(ids):])
            for ids in prompts]
