"""The package is layered: sub-packages in LAYERS order, modules in MODULE_ORDER inside each;
every module imports only modules below it, so there is no import cycle between modules or
between sub-packages. Imports inside functions and under TYPE_CHECKING count. Also checked:
at most 8 modules at the top level, at most 12 per sub-package, no module name used twice,
modules under 400 lines and functions under 60 lines."""

import ast
from pathlib import Path

import mlx_dpo

PACKAGE = Path(mlx_dpo.__file__).parent
# Lowest first: a top-level module or a sub-package.
LAYERS = ["errors", "util", "config", "model", "data", "forward", "loss", "monitor", "train", "export",
          "generation", "analysis", "cli", "entry", "__main__", "__init__"]
# Lowest first inside each sub-package (``__init__`` last). A module may be listed before it exists.
MODULE_ORDER = {
    "util": ["io", "paths", "clock", "hubnet", "metal", "distributed", "__init__"],
    "config": ["coerce", "checks", "keys", "fields", "__init__"],
    "model": ["architectures", "quant", "adapters", "toy", "ggml", "gguf_arch", "gguf_tokenizer", "gguf", "demo", "loader", "trainable", "trained",
              "__init__"],
    "data": ["base", "readers", "sources", "formats", "tokenize", "unpaired", "cache", "shapes", "batching", "__init__"],
    "forward": ["cpu_math", "blocks", "packed", "prefix", "logprobs", "decode", "__init__"],
    "loss": ["reduce", "pair_losses", "kto", "losses", "__init__"],
    "monitor": ["callbacks", "trackers", "health", "perf", "__init__"],
    "train": ["schedule", "state", "checkpoint", "rundir", "stopping", "preflight", "steps", "precompute",
              "evaluation", "loop", "trainer", "__init__"],
    "export": ["kquants", "gguf_types", "verify", "gguf_export", "writers", "hub", "exporter", "__init__"],
    "generation": ["judges", "generate", "sample", "__init__"],
    "analysis": ["lint", "report", "audit", "plan", "__init__"],
    "cli": ["options", "commands", "__init__"],
}
MAX_TOP_LEVEL, MAX_PER_PACKAGE, MAX_MODULE_LINES, MAX_FUNCTION_LINES = 8, 12, 400, 60


def module_name(path: Path) -> str:
    """``train.trainer``, ``data`` (a package's __init__), ``entry``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def is_package(name: str) -> bool:
    return (PACKAGE / Path(*name.split(".")) / "__init__.py").is_file() if name else True


def is_module(name: str) -> bool:
    return (PACKAGE / (name.replace(".", "/") + ".py")).is_file() or is_package(name)


def resolve(text: str, name: str, package: str = "mlx_dpo") -> set:
    """Modules of mlx_dpo (``train.trainer``, ``data``, ``errors``) that the source ``text`` of
    module ``name`` imports anywhere (``name`` of a package's __init__: the package)."""
    base = name.split(".") if is_package(name) and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module == package or (node.module or "").startswith(package + "."):
                parts = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(parts)
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                found.add(sub if is_module(sub) else (target or "__init__"))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith(package + "."))
    return found


def imports(path: Path) -> set:
    return resolve(path.read_text(), module_name(path))


def rank(name: str) -> tuple:
    """(layer, position inside the layer) of a module; a package imported whole is its __init__."""
    parts = name.split(".")
    if len(parts) == 1:
        return LAYERS.index(parts[0]), MODULE_ORDER[parts[0]].index("__init__") if parts[0] in MODULE_ORDER else 0
    return LAYERS.index(parts[0]), MODULE_ORDER[parts[0]].index(parts[1])


def files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_placed_in_the_layers():
    unknown = []
    for path in files():
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) == 1:
            if path.stem not in LAYERS:
                unknown.append(str(rel))
        elif rel.parts[0] not in MODULE_ORDER or path.stem not in MODULE_ORDER[rel.parts[0]]:
            unknown.append(str(rel))
    assert not unknown, f"add {unknown} to LAYERS / MODULE_ORDER in {__file__}"
    subpackages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert sorted(subpackages) == sorted(MODULE_ORDER), subpackages


def test_sizes_of_the_layout():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL, top
    for sub in MODULE_ORDER:
        modules = [p.name for p in (PACKAGE / sub).glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_PER_PACKAGE, (sub, modules)
    stems = [p.stem for p in files() if p.name != "__init__.py"]
    assert sorted(set(s for s in stems if stems.count(s) > 1)) == [], "a module name is used twice"


def upward(src: str, dep: str) -> bool:
    if dep == src:
        return False
    if dep == "__init__":  # the package's own API: nothing inside imports it
        return True
    return rank(dep) >= rank(src)


def test_no_module_imports_one_above_it():
    found = set()
    for path in files():
        src = module_name(path)
        for dep in imports(path):
            if src != "__init__" and upward(src, dep):
                found.add(f"{path.relative_to(PACKAGE)} -> {dep}")
    assert not found, sorted(found)


def test_modules_and_functions_are_short():
    long = set()
    for path in files():
        rel = str(path.relative_to(PACKAGE))
        text = path.read_text()
        if len(text.splitlines()) >= MAX_MODULE_LINES:
            long.add(rel)
        tree = ast.parse(text)
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child.parent = node
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 >= MAX_FUNCTION_LINES:
                owner = getattr(node, "parent", None)
                qual = f"{owner.name}.{node.name}" if isinstance(owner, ast.ClassDef) else node.name
                long.add(f"{rel}:{qual}")
    assert not long, sorted(long)


def test_the_checker_sees_imports_inside_functions():
    text = ("def f():\n    from .trainer import DPOTrainer\n    from . import checkpoint\n"
            "    from ..util import io\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from ..analysis.plan import plan\n")
    assert resolve(text, "train.steps") == {"train.trainer", "train.checkpoint", "util.io", "analysis.plan"}
    assert upward("train.steps", "analysis.plan") and not upward("train.steps", "util.io")
