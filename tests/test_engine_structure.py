"""The sampling core stays readable (issue 13): short functions, and every attribute created in `__init__`.

Read from the source (ast) of the engine, the samplers and their leaf modules, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

ROOT = Path(__file__).resolve().parents[1] / "kronfluence_bif"
CORE = [
    *sorted((ROOT / "engine").glob("*.py")),
    *sorted((ROOT / "samplers").glob("*.py")),
    *(ROOT / name for name in ("moments.py", "curvature.py", "checkpoints.py", "sampler.py")),
]
MAX_LINES = 60
CREATORS = ("__init__", "__enter__")


def _classes() -> Iterator[ast.ClassDef]:
    for path in CORE:
        yield from (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef))


def _self_targets(function: ast.FunctionDef) -> Set[str]:
    """Attributes `self.x` assigned anywhere in `function`."""
    found = set()
    for node in ast.walk(function):
        targets: List[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    found.add(sub.attr)
    return found


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long


def test_every_attribute_is_created_in_init():
    classes = list(_classes())
    created: Dict[str, Set[str]] = {}
    for cls in classes:
        names = {t.id for s in cls.body if isinstance(s, (ast.Assign, ast.AnnAssign)) for t in _names(s)}
        for f in cls.body:
            if isinstance(f, ast.FunctionDef) and f.name in CREATORS:
                names |= _self_targets(f)
        created[cls.name] = names

    def inherited(cls: ast.ClassDef) -> Set[str]:
        names = set(created[cls.name])
        for base in cls.bases:
            parent = next((c for c in classes if isinstance(base, ast.Name) and c.name == base.id), None)
            names |= inherited(parent) if parent is not None else set()
        return names

    late = []
    for cls in classes:
        known = inherited(cls)
        for f in cls.body:
            if isinstance(f, ast.FunctionDef) and f.name not in CREATORS:
                late += [f"{cls.name}.{a} (in {f.name})" for a in sorted(_self_targets(f) - known)]
    assert not late


def _names(statement: ast.AST) -> Iterator[ast.Name]:
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    return (t for t in targets if isinstance(t, ast.Name))
