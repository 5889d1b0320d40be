"""
Export a trained model to the Hugging Face format (transformers' built-in NanoChat architecture),
or import such a directory back into our checkpoints. The conversion is nanochat_ray/export.py.

    python jobs/export.py --stage sft --out hf/nanochat-sft          # latest step; the stage's only model
    python jobs/export.py --stage mid --model-tag d20 --step 800 --out hf/mid800
    python jobs/export.py --from-hf hf/nanochat-sft --stage sft --model-tag d4-imported

Then, anywhere transformers >= 5 is installed (no remote code):
    AutoModelForCausalLM.from_pretrained("hf/nanochat-sft"); AutoTokenizer.from_pretrained(...)

Needs the `export` extra: pip install -e '.[export]'.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanochat_ray.checkpoint import (CheckpointError, build_model_from_checkpoint, checkpoint_dir,
                                     resolve_model_tag, save_checkpoint)
from nanochat_ray.common import base_dir, default_tokenizer_dir
from nanochat_ray.export import ExportError, export_hf, import_hf
from nanochat_ray.tokenizer import TOKENIZER_FILE, Tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="sft", choices=["base", "mid", "sft", "rl"])
    parser.add_argument("--model-tag", default=None, help="default: the stage's only trained model")
    parser.add_argument("--step", type=int, default=None, help="export: default the latest; import: default 0")
    parser.add_argument("--out", type=Path, help="export into this new (or empty) directory")
    parser.add_argument("--from-hf", type=Path, help="import this Hugging Face directory instead")
    parser.add_argument("--root", type=Path, default=None, help="artifact root; default NANOCHAT_BASE_DIR")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.from_hf is None):
        parser.error("give exactly one of --out DIR (export) or --from-hf DIR (import)")
    root = args.root or base_dir()
    try:
        if args.out is not None:
            tag = resolve_model_tag(args.stage, args.model_tag, root)
            model, meta = build_model_from_checkpoint(args.stage, tag, args.step, "cpu", root)
            out = export_hf(model, Tokenizer.from_directory(default_tokenizer_dir(root)), args.out)
            print(f"exported {args.stage}/{tag} step {meta['step']} to {out}")
        else:
            import_into(args.from_hf, args.stage, args.model_tag, args.step or 0, root)
    except (CheckpointError, ExportError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


def import_into(directory: Path, stage: str, model_tag: str | None, step: int, root: Path) -> None:
    """Write an imported model as a checkpoint; the tokenizer goes to <root>/tokenizer unless one
    is there already, which must then be the same."""
    model, tokenizer = import_hf(directory)
    tag = model_tag or f"d{model.config.n_layer}"
    tokenizer_dir = default_tokenizer_dir(root)
    if (tokenizer_dir / TOKENIZER_FILE).is_file():
        if Tokenizer.from_directory(tokenizer_dir).hf.get_vocab() != tokenizer.hf.get_vocab():
            raise ExportError(f"{tokenizer_dir} holds a different tokenizer than {directory}: import into "
                              "another --root, or move that tokenizer away")
    else:
        tokenizer.save(tokenizer_dir)
    target = checkpoint_dir(stage, tag, root)
    save_checkpoint(target, step, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(model.config), "imported_from": str(directory.resolve())})
    print(f"imported {directory} as {stage}/{tag} step {step} ({target})")


if __name__ == "__main__":
    main()
