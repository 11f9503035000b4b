"""Import direction of pallas_kernels: it imports nothing of slora_jax or server, its modules import each
other without cycles, only at module level and only by public names, and every module imports alone."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "pallas_kernels"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imports(name: str, tree: ast.Module) -> list[tuple[ast.stmt, str, list[str]]]:
    """(statement, absolute module, names taken from it) of every import statement of the module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append((node, mod, [a.name for a in node.names]))
    return out


def _edges(name: str) -> set[str]:
    """The package's modules this module imports (`from .gpu import lora` is pallas_kernels.gpu.lora)."""
    out = set()
    for _, mod, names in _imports(name, TREES[name]):
        if mod.split(".")[0] != PKG:
            continue
        subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
        out.update(subs or [mod])
    return out - {name}


def test_every_module_is_found():
    assert {"pallas_kernels", "pallas_kernels.common", "pallas_kernels.reference", "pallas_kernels.gpu.lora",
            "pallas_kernels.gpu.attention", "pallas_kernels.tpu.lora",
            "pallas_kernels.tpu.attention"} <= set(MODULES)


def test_imports_nothing_of_slora_jax_or_server():
    bad = [(name, mod) for name in MODULES for _, mod, _ in _imports(name, TREES[name])
           if mod.split(".")[0] in ("slora_jax", "server")]
    assert not bad, f"pallas_kernels must not import slora_jax or server: {bad}"


def test_no_import_cycles():
    graph = {name: _edges(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_at_module_level_and_by_public_names():
    """No import inside a function (a lazy import dodging a cycle) and no private name taken from another
    module of the package."""
    for name, tree in TREES.items():
        top = {id(n) for n in tree.body}
        for node, mod, names in _imports(name, tree):
            assert id(node) in top, f"{name}: import of {mod} at line {node.lineno} is not at module level"
            if mod.split(".")[0] == PKG:
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name}: imports private {private} from {mod}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_alone(name):
    code = ("import importlib, sys\n"
            f"importlib.import_module({name!r})\n"
            "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('slora_jax', 'server'))\n"
            "assert not leaked, leaked\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
