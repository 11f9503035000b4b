"""Imports run one way: server -> slora_jax -> pallas_kernels (docs/ARCHITECTURE.md), read from the source with ast.

The server reaches slora_jax only through its public face (the package itself, `api`, `errors`, and
`cli`, whose parser `serve` extends); slora_jax never imports the server; pallas_kernels imports neither.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("server", "slora_jax", "pallas_kernels")
SERVER_MAY_IMPORT = {"slora_jax", "slora_jax.api", "slora_jax.errors", "slora_jax.cli"}


def imports_of(path: pathlib.Path) -> set:
    """Absolute module names a source file imports (relative imports resolved), at any depth in the file."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def sources(package: str) -> list:
    return sorted((ROOT / package).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_downward(package):
    below = {"server": {"slora_jax", "pallas_kernels"}, "slora_jax": {"pallas_kernels"}, "pallas_kernels": set()}
    for path in sources(package):
        wrong = {n for n in imports_of(path) if top(n) in PACKAGES and top(n) != package and top(n) not in below[package]}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_server_uses_only_the_public_api():
    for path in sources("server"):
        used = {n for n in imports_of(path) if top(n) == "slora_jax"}
        # `from slora_jax import X` records slora_jax.X too: names, not modules, unless they are modules
        modules = {n for n in used if (ROOT / (n.replace(".", "/") + ".py")).exists()
                   or (ROOT / n.replace(".", "/")).is_dir()}
        assert modules <= SERVER_MAY_IMPORT, f"{path.relative_to(ROOT)} imports {sorted(modules - SERVER_MAY_IMPORT)}"


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    src = ROOT / "slora_jax" / "engine" / "engine.py"
    found = imports_of(src)
    assert "slora_jax.engine.request" in found and "pallas_kernels" in found and "slora_jax.errors" in found
