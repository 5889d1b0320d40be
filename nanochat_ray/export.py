"""
Our checkpoints ↔ the Hugging Face format that transformers' built-in NanoChat architecture
loads (`AutoModelForCausalLM.from_pretrained(DIR)`, no remote code). The CLI is jobs/export.py:

    python jobs/export.py --stage sft --out hf/                  # export the latest sft step
    python jobs/export.py --from-hf hf/ --stage sft --model-tag d4   # import back

    export_hf(model, tokenizer, out_dir)        # model.safetensors, config.json, generation_config.json,
                                                # tokenizer.json, tokenizer_config.json (chat template)
    model, tokenizer = import_hf(directory)

An export never writes a model that computes something else: the GPT config and the state_dict
must be exactly what the mapping knows, and before anything is written the transformers model
is built from the converted weights and must reproduce our forward (hidden states and logits,
fp32) on a probe sequence. Needs the `export` extra (transformers >= 5, safetensors).
"""

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch

from nanochat_ray.gpt import GPT, SOFTCAP, GPTConfig, build_gpt
from nanochat_ray.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer

ROPE_THETA = 10000.0  # GPT.rotary_table's base
# our norm is F.rms_norm without eps, which takes the input dtype's epsilon: fp32 here
RMS_NORM_EPS = torch.finfo(torch.float32).eps
PROBE_TOLERANCE = 1e-4  # max |Δ| allowed on the probe's hidden states and logits (fp32, logits in ±15)

# our parameter name → transformers' NanoChatForCausalLM name ("{i}" is the layer)
_LAYER_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
_KNOWN_CONFIG = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}

# Renders exactly what Tokenizer.render_conversation / render_for_completion produce (SPEC §2):
# <|bos|>, a leading system message merged into the first user message with a blank line,
# user/assistant alternating, assistant content as a string or text/python/python_output parts.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages|length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('message 0 is a system message; message 1 must be a user message') -}}"
    "{%- endif -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in turns -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user') -}}"
    "{%- endif -%}"
    "{%- if expected == 'user' -%}"
    "{{- '<|user_start|>' + (system if loop.first else '') + message['content'] + '<|user_end|>' -}}"
    "{%- else -%}{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown content part type ' + part['type']) -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


class ExportError(ValueError):
    """The model or directory cannot be converted faithfully; the message says why."""


def _require_transformers():
    try:
        import transformers  # noqa: F401
        from safetensors.torch import load_file, save_file  # noqa: F401
    except ImportError as error:
        raise ExportError(f"export needs transformers >= 5 and safetensors ({error}): "
                          "pip install -e '.[export]'") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ExportError(f"transformers {transformers.__version__} has no NanoChat architecture: "
                          "pip install 'transformers>=5'")


def to_hf_state(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Our state_dict → NanoChatForCausalLM's, fp32. Refuses any key the mapping does not know."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in _LAYER_NAMES.items()})
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    unknown, missing = sorted(set(state) - set(names)), sorted(set(names) - set(state))
    if unknown or missing:
        raise ExportError(f"the model's parameters differ from what NanoChat can express: "
                          f"unknown {unknown[:8]}, missing {missing[:8]}; refusing to export")
    return {names[k]: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def from_hf_state(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """NanoChatForCausalLM's state_dict → ours (the inverse of to_hf_state)."""
    names = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        names.update({f"model.layers.{i}.{theirs}": f"transformer.h.{i}.{ours}" for ours, theirs in _LAYER_NAMES.items()})
    unknown, missing = sorted(set(state) - set(names)), sorted(set(names) - set(state))
    if unknown or missing:
        raise ExportError(f"the safetensors weights are not a NanoChat model of {n_layer} layers: "
                          f"unknown {unknown[:8]}, missing {missing[:8]}")
    return {names[k]: v for k, v in state.items()}


def hf_config(config: GPTConfig, tokenizer: Tokenizer):
    """The NanoChatConfig that computes what GPT(config) computes."""
    _require_transformers()
    from transformers import NanoChatConfig

    extra = {f.name for f in fields(config)} - _KNOWN_CONFIG
    if extra:
        raise ExportError(f"GPTConfig fields {sorted(extra)} have no NanoChat counterpart; refusing to export")
    special = tokenizer.encode_special
    return NanoChatConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, max_position_embeddings=config.sequence_len,
        hidden_act="relu2", rms_norm_eps=RMS_NORM_EPS, final_logit_softcapping=SOFTCAP,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, attention_bias=False,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=special("<|assistant_end|>"), pad_token_id=special("<|assistant_end|>"),
        architectures=["NanoChatForCausalLM"])


def gpt_config_from_hf(config: dict) -> GPTConfig:
    """The GPTConfig for a NanoChat config.json; refuses settings our GPT does not compute."""
    required = {"model_type": "nanochat", "hidden_act": "relu2", "final_logit_softcapping": SOFTCAP,
                "attention_bias": False, "tie_word_embeddings": False, "rms_norm_eps": RMS_NORM_EPS}
    wrong = {k: config.get(k) for k, v in required.items() if config.get(k) != v}
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope.get("rope_theta") != ROPE_THETA:
        wrong["rope_parameters"] = rope
    if config.get("intermediate_size") != 4 * config.get("hidden_size", -1):
        wrong["intermediate_size"] = config.get("intermediate_size")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        wrong["head_dim"] = head_dim
    if wrong:
        raise ExportError(f"config.json settings our GPT does not compute: {wrong}; ours need {required}, "
                          f"default rope with theta {ROPE_THETA}, intermediate_size = 4 × hidden_size")
    return GPTConfig(sequence_len=config["max_position_embeddings"], vocab_size=config["vocab_size"],
                     n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                     n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
                     n_embd=config["hidden_size"])


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "additional_special_tokens": SPECIAL_TOKENS[1:],
            "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE}


@contextlib.contextmanager
def exact_rotary(model: GPT) -> Iterator[GPT]:
    """`model` with fp32 rotary tables, as transformers keeps them. Ours are rounded to bf16, as the
    reference's are: the same function, but the rounding moves logits by ~1e-3 (as it does between
    the reference and transformers' port of it), which would hide a real difference."""
    saved = model.cos, model.sin
    model.cos, model.sin = model.rotary_table(model.rotary_len, model.config.head_dim, dtype=torch.float32)
    try:
        yield model
    finally:
        model.cos, model.sin = saved


@torch.no_grad()
def _check_parity(ours: GPT, theirs, vocab_size: int) -> None:
    """Refuse unless transformers' model reproduces our forward (on exact rotary tables) on a probe."""
    probe = torch.randint(0, vocab_size, (1, min(32, ours.config.sequence_len)), generator=torch.Generator().manual_seed(0))
    with exact_rotary(ours):
        pairs = (("hidden states", ours.hidden_states(probe), theirs.model(input_ids=probe).last_hidden_state),
                 ("logits", ours(probe), theirs(input_ids=probe).logits))
    for what, a, b in pairs:
        gap = (a - b).abs().max().item()
        if not gap <= PROBE_TOLERANCE:
            raise ExportError(f"transformers' NanoChat computes different {what} than our GPT (max |Δ| {gap:.3g} "
                              f"> {PROBE_TOLERANCE}) with this model; refusing to export")


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory for `model`, all at once (a temp dir renamed into place).

    `out_dir` must not exist or be empty. Weights are written in fp32 (`model` is converted in place).
    """
    _require_transformers()
    from transformers import GenerationConfig, NanoChatForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory: pick a new --out or remove it")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size:,} tokens, the model {model.config.vocab_size:,}: "
                          "they are not a pair (check --tokenizer-dir)")
    model = model.float().eval()
    config = hf_config(model.config, tokenizer)
    state = to_hf_state(model.state_dict(), model.config.n_layer)
    with torch.device("meta"):
        hf_model = NanoChatForCausalLM(config)
    hf_model.load_state_dict(state, strict=False, assign=True)  # non-persistent rotary buffers stay
    hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(config)  # rebuilt off the meta device
    hf_model.eval()
    _check_parity(model, hf_model, config.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        hf_model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, pad_token_id=config.pad_token_id,
            eos_token_id=list(tokenizer.answer_end_ids))
        hf_model.save_pretrained(tmp)
        # the plain tokenizers file: encode_special_tokens is ours and not saved, so transformers
        # reads <|...|> in rendered templates as the special tokens
        (tmp / TOKENIZER_FILE).write_text(tokenizer.hf.to_str())
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(tokenizer, model.config.sequence_len), indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def import_hf(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """A GPT and Tokenizer from a NanoChat Hugging Face directory (ours or any that fits our GPT)."""
    _require_transformers()
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in ("config.json", "model.safetensors", TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise ExportError(f"{directory / name} not found: --from-hf needs a directory that export wrote "
                              "(sharded safetensors are not read)")
    config = gpt_config_from_hf(json.loads((directory / "config.json").read_text()))
    state = from_hf_state(load_file(directory / "model.safetensors", device=str(device)), config.n_layer)
    model = build_gpt(config, device)
    model.load_state_dict(state, strict=True, assign=True)
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        raise ExportError(f"{directory / TOKENIZER_FILE} lacks our special tokens {missing}")
    return model, Tokenizer(hf, Tokenizer._byte_lengths(hf.get_vocab()))
