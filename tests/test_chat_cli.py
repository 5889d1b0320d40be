"""The terminal chat: one-shot and multi-turn, streaming, on a saved checkpoint."""

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from nanochat_ray.checkpoint import checkpoint_dir, save_checkpoint
from nanochat_ray.config import make_config
from nanochat_ray.gpt import build_gpt

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "jobs" / "chat_cli.py")
chat_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_cli)


@pytest.fixture
def sft_checkpoint(tmp_path, monkeypatch, smoke_tokenizer_dir):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    shutil.copytree(smoke_tokenizer_dir, tmp_path / "tokenizer")
    cfg = make_config("smoke")
    torch.manual_seed(0)
    model = build_gpt(cfg.gpt_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    save_checkpoint(checkpoint_dir("sft", cfg.model_tag), 5, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(cfg.gpt_config())})


def test_one_shot_streams_the_answer(sft_checkpoint):
    pieces = []
    messages = chat_cli.main(["--preset", "smoke", "-p", "hello", "--max-tokens", "12", "--temperature", "0"],
                             write=pieces.append)
    answer = messages[-1]["content"]
    assert messages[0] == {"role": "user", "content": "hello"} and messages[-1]["role"] == "assistant"
    assert "".join(pieces) == answer + "\n" and len(pieces) > 2  # streamed in pieces, not at the end


def test_multi_turn_keeps_the_conversation(sft_checkpoint):
    lines = iter(["hi", "clear", "one", "two", "quit"])
    messages = chat_cli.main(["--preset", "smoke", "--max-tokens", "4"], read=lambda _: next(lines),
                             write=lambda _: None)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[::2]] == ["one", "two"]  # "clear" dropped "hi"


def test_bad_flags_are_refused(sft_checkpoint):
    with pytest.raises(SystemExit):
        chat_cli.main(["--preset", "smoke", "--temperature", "3"])
