"""Export to the Hugging Face format (jobs/export.py, nanochat_ray/export.py): transformers' built-in
NanoChat computes our logits, its chat template renders our ids, the import gives back our weights,
and a model transformers would compute differently is refused."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nanochat_ray import gpt as gpt_module
from nanochat_ray.checkpoint import build_model_from_checkpoint, checkpoint_dir, save_checkpoint
from nanochat_ray.config import make_config
from nanochat_ray.export import ExportError, exact_rotary, export_hf
from nanochat_ray.gpt import build_gpt
from nanochat_ray.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", minversion="5")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.export import main as export_main  # noqa: E402

LOGIT_TOLERANCE = 1e-5  # fp32, logits in (-15, 15); the two forwards run the same ops in the same order
ROTARY_ROUNDING = 1e-2  # our bf16 rotary tables vs transformers' fp32 ones (measured ~2e-3 on this model)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute "},
                                      {"type": "python", "text": "12 * 7"},
                                      {"type": "python_output", "text": "84"},
                                      {"type": "text", "text": " so: 84."}]},
    {"role": "user", "content": "Thanks! ünïcödé\nand a new line"},
    {"role": "assistant", "content": "You're welcome."},
]


def _model():
    torch.manual_seed(0)
    model = build_gpt(dataclasses.replace(make_config("smoke").gpt_config(), n_head=2, n_kv_head=1))  # GQA
    with torch.no_grad():  # init leaves the lm_head and output projections at zero: make every weight count
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def exported(smoke_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_root")
    shutil.copytree(smoke_tokenizer_dir, root / "tokenizer")
    model = _model()
    save_checkpoint(checkpoint_dir("sft", "d2", root), 7, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(model.config)})
    out = root / "hf"
    export_main(["--stage", "sft", "--out", str(out), "--root", str(root)])
    return {"root": root, "out": out, "model": model}


def test_export_writes_the_files_transformers_needs(exported):
    assert sorted(p.name for p in exported["out"].iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((exported["out"] / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["num_key_value_heads"] == 1
    assert config["final_logit_softcapping"] == 15.0 and config["hidden_act"] == "relu2"


def test_transformers_computes_our_logits(exported):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(exported["out"]).eval()
    assert type(theirs).__name__ == "NanoChatForCausalLM" and theirs.dtype == torch.float32
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), exact_rotary(exported["model"]) as exact:
        ours_exact = exact(ids)
    with torch.no_grad():
        ours, hf = exported["model"](ids), theirs(input_ids=ids).logits
    assert ours.std() > 0.5  # the comparison is not between two near-constant outputs
    # the same function: with transformers' fp32 rotary tables, the same logits
    assert (ours_exact - hf).abs().max().item() <= LOGIT_TOLERANCE
    # with ours rounded to bf16 (as the reference's), only that rounding apart
    assert (ours - hf).abs().max().item() <= ROTARY_ROUNDING


def test_chat_template_renders_our_ids(exported, smoke_tokenizer_dir):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(exported["out"])
    ours = Tokenizer.from_directory(smoke_tokenizer_dir)
    ids, _ = ours.render_conversation({"messages": CONVERSATION})
    assert theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"] == ids
    prompt = theirs.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert prompt == ours.render_for_completion({"messages": CONVERSATION})
    assert theirs.decode(ids[1:8]) == ours.decode(ids[1:8])


def test_import_gives_back_identical_weights(exported, tmp_path):
    export_main(["--from-hf", str(exported["out"]), "--stage", "mid", "--model-tag", "d2x", "--step", "7",
                 "--root", str(tmp_path)])
    model, meta = build_model_from_checkpoint("mid", "d2x", None, "cpu", tmp_path)
    assert meta["step"] == 7 and model.config == exported["model"].config
    original = exported["model"].state_dict()
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert Tokenizer.from_directory(tmp_path / "tokenizer").hf.get_vocab() == \
        Tokenizer.from_directory(exported["root"] / "tokenizer").hf.get_vocab()


def test_a_model_transformers_would_compute_differently_is_refused(smoke_tokenizer_dir, tmp_path, monkeypatch):
    tokenizer = Tokenizer.from_directory(smoke_tokenizer_dir)
    # a different norm epsilon than the config can state: caught by the probe, nothing written
    monkeypatch.setattr(gpt_module, "norm", lambda x: torch.nn.functional.rms_norm(x, (x.size(-1),), eps=0.5))
    with pytest.raises(ExportError, match="computes different hidden states"):
        export_hf(_model(), tokenizer, tmp_path / "a")
    monkeypatch.undo()
    model = _model()
    model.register_parameter("extra_gate", torch.nn.Parameter(torch.ones(3)))  # nowhere to put it
    with pytest.raises(ExportError, match="unknown \\['extra_gate'\\]"):
        export_hf(model, tokenizer, tmp_path / "b")
    assert not list(tmp_path.iterdir())
