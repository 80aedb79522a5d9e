"""The package is layered: every module imports only modules below it in LAYERS, so there
is no import cycle. Imports inside functions and under TYPE_CHECKING count."""

import ast
from pathlib import Path

import mlx_dpo

PACKAGE = Path(mlx_dpo.__file__).parent
# Lowest first. A package (data/) is one entry; its own modules are checked the same way.
LAYERS = [
    "clock", "io", "hubnet", "coerce", "config", "toy", "schedule", "distributed", "architectures", "cpu_math", "blocks", "packed", "data", "shapes", "batching",
    "state", "quant", "adapters", "gguf", "demo",
    "model", "prefix", "logprobs", "reduce", "pair_losses", "losses", "steps", "perf", "metal", "reference", "checkpoint",
    "rundir", "faults", "stopping", "callbacks", "trackers", "health", "preflight", "evaluation", "trainer", "plan",
    "verify", "gguf_export", "formats", "hub",
    "export", "report", "lint", "audit", "generate", "judges", "sample", "cli", "entry", "__main__", "__init__",
]
DATA_LAYERS = ["base", "readers", "sources", "formats", "tokenize", "cache", "__init__"]


def imports(path: Path, package: str = "mlx_dpo") -> set:
    """Names of the sibling modules (or sub-packages) that ``path`` imports anywhere."""
    inside = path.parent != PACKAGE  # a module of a sub-package: level 1 is the sub-package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 2 and inside:  # from ..config import X / from .. import hubnet
                found.update([("..", node.module.split(".")[0])] if node.module else
                             [("..", a.name) for a in node.names])
            elif (node.module or "").startswith(package + "."):
                found.add(("..", node.module.split(".")[1]) if inside else node.module.split(".")[1])
            elif node.module == package and not inside:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(package + "."):
                    found.add(("..", a.name.split(".")[1]) if inside else a.name.split(".")[1])
    return found


def modules():
    for path in sorted(PACKAGE.glob("*.py")):
        yield path.stem, path
    for path in sorted(PACKAGE.iterdir()):
        if path.is_dir() and (path / "__init__.py").is_file():
            yield path.name, path


def test_every_module_is_placed_in_the_layers():
    unknown = [name for name, _ in modules() if name not in LAYERS]
    assert not unknown, f"add {unknown} to LAYERS in {__file__}"
    sub = sorted(p.stem for p in (PACKAGE / "data").glob("*.py"))
    assert sorted(DATA_LAYERS) == sub, sub


def test_no_module_imports_one_above_it():
    upward = []
    for name, path in modules():
        files = [path] if path.is_file() else sorted(path.glob("*.py"))
        for file in files:
            for dep in imports(file):
                if isinstance(dep, tuple):  # a sub-package's module importing the top level
                    dep = dep[1]
                elif path.is_dir():  # within the sub-package
                    if DATA_LAYERS.index(dep) >= DATA_LAYERS.index(file.stem):
                        upward.append(f"data/{file.name} -> data.{dep}")
                    continue
                if dep != name and LAYERS.index(dep) >= LAYERS.index(name):
                    upward.append(f"{file.relative_to(PACKAGE)} -> {dep}")
    assert not upward, upward


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from .trainer import DPOTrainer\n    from . import checkpoint\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .plan import plan\n")
    assert imports(source) == {"trainer", "checkpoint", "plan"}
