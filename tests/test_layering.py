"""The export side is layered: no module imports one above it (imports inside functions count)."""

import ast
from pathlib import Path

import pytest

import mlx_dpo

PACKAGE = Path(mlx_dpo.__file__).parent
LAYERED = ["architectures", "io", "model", "verify", "formats", "hub", "export", "prefix", "logprobs"]


def imports(module: str) -> set:
    """The ``mlx_dpo`` modules ``module`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_dpo."):
            found.add(node.module.split(".")[1])
    return found - {module}


@pytest.mark.parametrize("module", LAYERED)
def test_no_import_cycle_through(module):
    seen, todo = set(), list(imports(module))
    while todo:
        other = todo.pop()
        assert other != module, f"{module} imports itself through {sorted(seen)}"
        if other not in seen:
            seen.add(other)
            todo.extend(imports(other))


def test_export_sits_above_hub_and_formats():
    assert "hub" in imports("export") and "formats" in imports("hub")
    assert not imports("hub") & {"export"} and not imports("formats") & {"export", "hub"}
