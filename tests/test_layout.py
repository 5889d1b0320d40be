"""The core is plain PyTorch: importing it must not import Ray (DESIGN principle 1)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["config", "common", "gpt", "tokenizer", "optim", "checkpoint", "data.registry", "evals.bpb", "evals.core",
        "evals.chat", "evals.sandbox", "tasks", "train.loop"]
CORE += [m for m in ("engine", "calculator") if (ROOT / "nanochat_ray" / f"{m}.py").exists()]
CORE += ["rl.policy", "rl.tasks", "gpus", "plan"]  # RL's arithmetic and rewards; rl.actors and rl.loop are the Ray edge


def test_core_modules_do_not_import_ray():
    imports = "; ".join(f"import nanochat_ray.{m}" for m in CORE)
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_torch_load_refuses_pickled_code():
    # torch < 2.6 unpickles arbitrary objects by default: a poisoned checkpoint would run code
    import ast

    unsafe = []
    # our own code only: virtual environments (CI's lives in the checkout) hold third-party calls
    ours = [path for folder in ("nanochat_ray", "jobs", "serve", "bench", "tests") for path in (ROOT / folder).rglob("*.py")]
    assert len(ours) > 50, "the scan must see the project's files"
    for path in sorted(ours):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                                for k in node.keywords)):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
