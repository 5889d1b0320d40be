"""
The layers of the tree (README, Architecture) and what may import what:

    core       nanochat_ray/*, except the Ray edges: plain PyTorch, imports neither Ray nor an edge
    Ray edges  the modules in EDGES: Ray Data pipelines, Ray Train workers and drivers, actors
    serve      serve/*: the Ray Serve app, on top of the core
    jobs       jobs/*: entry points, may import all of the above

    python -m pytest -q tests/test_layout.py

The rule is checked file by file from the source (an import inside a function counts too), and
once more by importing every core module in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nanochat_ray"
# the only library modules that may import ray; every other module of nanochat_ray is core
EDGES = {"data.pipeline", "data.pacing", "data.download", "train.worker", "train.process_group", "train.pretrain", "train.finetune", "train.sweep",
         "evals.actors", "rl.actors", "rl.driver"}
# core modules that start a Ray client on request (init_ray, a cluster's GPU count): ray is
# imported inside the one function that needs it, never when the module loads
LAZY_RAY = {"common", "config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> list[str]:
    """Every module a file imports (absolute names), at any depth or only when it loads."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    if top_level_only:  # module-level statements, including those under if/try at module level
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def is_module(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


LIBRARY = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
CORE = sorted(set(LIBRARY) - EDGES - {""})


def test_every_listed_module_exists():
    # a renamed or deleted edge must be renamed here too, not silently dropped from the rule
    missing = sorted((EDGES | LAZY_RAY) - set(LIBRARY))
    assert missing == [], f"listed in tests/test_layout.py but not in nanochat_ray/: {missing}"
    assert len(CORE) > 30, "the scan must see the core's modules"


def test_core_modules_import_neither_ray_nor_an_edge():
    broken = []
    for name in CORE:
        path = LIBRARY[name]
        for imported in imports(path):
            if any(is_module(imported, f"nanochat_ray.{edge}") for edge in EDGES):
                broken.append(f"{name} imports the Ray edge {imported}")
            elif is_module(imported, "ray") and (name not in LAZY_RAY or imported in imports(path, True)):
                broken.append(f"{name} imports {imported}")
    assert broken == [], "the core must stay Ray-free (move the code to an edge):\n" + "\n".join(broken)


def test_layers_import_downward_only():
    rules = {"nanochat_ray": ("jobs", "serve", "bench", "tests"), "serve": ("jobs", "bench", "tests"),
             "jobs": ("bench", "tests")}
    broken = [f"{path.relative_to(ROOT)} imports {imported}"
              for folder, forbidden in rules.items() for path in sorted((ROOT / folder).rglob("*.py"))
              for imported in imports(path) if any(is_module(imported, layer) for layer in forbidden)]
    assert broken == [], "\n".join(broken)


def test_core_modules_do_not_import_ray():
    imports_ = "; ".join(f"import nanochat_ray.{m}" for m in CORE)
    code = f"import sys; {imports_}; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_backend_config_unpickles_without_torch():
    # Ray Train's controller unpickles it (train/worker.py gives it the stage's spec by reference):
    # torch there would be a CPU second on the way to step 1 (README, Start-up)
    code = ("import pickle, sys; from nanochat_ray.train.process_group import ProcessGroupConfig; "
            "sys.stdout.buffer.write(pickle.dumps(ProcessGroupConfig(backend='gloo')))")
    pickled = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, check=True).stdout
    code = ("import pickle, sys; config = pickle.loads(sys.stdin.buffer.read()); assert config.backend == 'gloo'; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], input=pickled, capture_output=True, cwd=ROOT, check=True)
    assert out.stdout.decode().strip() == "[]", out.stdout


def test_an_eager_training_step_does_not_import_dynamo():
    # torch._dynamo is a CPU second of imports, in the worker on the way to step 1; the model build,
    # the optimizers and the head loss keep clear of what imports it (README, Start-up)
    code = ("import sys, torch; from nanochat_ray.gpt import GPTConfig, build_gpt; "
            "from nanochat_ray.optim import build_optimizers, step_optimizers; "
            "model = build_gpt(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)); "
            "optimizers = build_optimizers(model); idx = torch.randint(0, 256, (2, 32)); "
            "model(idx, targets=idx).backward(); step_optimizers(optimizers, 1.0); "
            "model(idx, targets=idx, loss_reduction='none').sum().backward(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_the_data_actors_module_does_not_import_torch():
    # the pretraining pipeline's processes (its feeder and Ray Data actors) import only
    # data/pipeline.py: torch would be a second of CPU each on the way to step 1 (README, Start-up)
    code = ("import sys, nanochat_ray.data.pipeline; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
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
