"""The import layering of the package, read from the source (ast), without importing anything.

The library (`kronfluence_bif` outside `demo/`) never imports the demo, and nothing in the package imports the
command line, which sits on top. Imports inside functions count as well.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Optional, Set

PACKAGE = "kronfluence_bif"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
DEMO = f"{PACKAGE}.demo"
CLI = f"{PACKAGE}.cli"


def module_name(path: Path) -> str:
    """`kronfluence_bif/demo/tiny_lm/train.py` -> `kronfluence_bif.demo.tiny_lm.train` (packages without `__init__`)."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    """Every module of the package (library and demo), by dotted name."""
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def library_modules() -> Dict[str, Path]:
    """The modules that users import: everything but the demo."""
    return {name: path for name, path in package_modules().items() if not _within(name, DEMO)}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported_modules(path: Path, tree: Optional[ast.AST] = None) -> Set[str]:
    """The package modules `path` imports, as dotted names (`from kronfluence_bif import storage` gives
    `kronfluence_bif.storage`, `from kronfluence_bif import Analyzer` gives `kronfluence_bif`)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    known = package_modules()
    found: Set[str] = set()
    tree = tree if tree is not None else ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {module for module in found if _within(module, PACKAGE)}


def test_the_walk_finds_the_package_and_its_imports():
    modules = package_modules()
    assert {PACKAGE, CLI, f"{PACKAGE}.analyzer", DEMO, f"{DEMO}.tiny_lm", f"{DEMO}.tiny_lm.train"} <= set(modules)
    assert f"{PACKAGE}.storage" in imported_modules(modules[f"{PACKAGE}.cli"])
    assert f"{DEMO}.tiny_lm.corpus" in imported_modules(modules[f"{DEMO}.tiny_lm.train"])


def test_the_library_never_imports_the_demo():
    offenders = {
        name: sorted(m for m in imported_modules(path) if _within(m, DEMO)) for name, path in library_modules().items()
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_nothing_in_the_package_imports_the_command_line():
    offenders = {
        name: sorted(m for m in imported_modules(path) if _within(m, CLI))
        for name, path in package_modules().items()
        if name != CLI
    }
    assert not {name: found for name, found in offenders.items() if found}


# Modules at the bottom: everything may import them, they import nothing from the package.
LEAVES = ("errors", "tables", "argtypes", "usage", "heap")


def test_leaf_modules_import_nothing_from_the_package():
    modules = package_modules()
    found = {leaf: sorted(imported_modules(modules[f"{PACKAGE}.{leaf}"])) for leaf in LEAVES}
    assert not {leaf: imports for leaf, imports in found.items() if imports}


# The layers, lowest first: a module imports (at run time) only modules of its own layer or lower ones. Type-only
# imports (`if TYPE_CHECKING:`) are exempt: they run nowhere. A new module goes in the lowest layer it can.
LAYERS = [
    ["errors", "logs", "tables", "argtypes", "usage", "heap", "moments", "parameters", "task"],
    ["storage", "threads", "compiled", "tracking", "curvature", "distributed", "loss_views", "tasks", "batched"],
    ["checkpoints", "data", "compare"],
    ["samplers", "samplers.*", "sampler", "inspection", "lds", "testing"],
    ["arguments"],
    ["diagnostics", "engine", "engine.*"],
    ["requests", "problem"],
    ["scoring", "calibrate"],
    ["analyzer"],
    ["", "cli", "__main__"],  # "" is the package itself
]


def layer_of(module: str) -> int:
    short = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    for level, names in enumerate(LAYERS):
        if short in names or any(n.endswith(".*") and short.startswith(n[:-1]) for n in names):
            return level
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")


def runtime_imports(path: Path) -> Set[str]:
    """`imported_modules` without the imports under `if TYPE_CHECKING:`, and without the package itself where it
    only names submodules (`from kronfluence_bif import storage` imports `storage`, not the package's API)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = [ast.Pass()]
    known = package_modules()
    api = any(
        isinstance(node, ast.ImportFrom)
        and node.module == PACKAGE
        and any(f"{PACKAGE}.{a.name}" not in known for a in node.names)
        for node in ast.walk(tree)
    )
    found = imported_modules(path, tree)
    return found if api else found - {PACKAGE}


def test_imports_never_go_up_a_layer():
    offenders = []
    for name, path in library_modules().items():
        for module in runtime_imports(path):
            if module != name and layer_of(module) > layer_of(name):
                offenders.append(f"{name} (layer {layer_of(name)}) imports {module} (layer {layer_of(module)})")
    assert not offenders, "\n".join(sorted(offenders))
