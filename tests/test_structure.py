"""The library's shape (issue 13): short functions and state created in `__init__` (imports: test_layers.py).

Static checks over the source (ast), so they cost milliseconds. The demo package is exempt from the length limit
(it is a script with prose), not from the rest.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "kronfluence_bif"
MAX_FUNCTION_LINES = 60
# where an attribute may first be set: the constructor, a context manager's entry, a dataclass's post-init
CONSTRUCTORS = {"__init__", "__enter__", "__post_init__", "__new__", "setUp"}


def library_files(include_demo: bool = True) -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if include_demo or "demo" not in path.relative_to(PACKAGE).parts:
            yield path


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def long_functions(path: Path) -> List[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def _self_assignments(function: ast.AST) -> Set[str]:
    names = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            continue
        for target in targets:
            for t in ast.walk(target) if target is not None else []:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def _classes() -> Dict[str, Tuple[Path, ast.ClassDef]]:
    return {
        n.name: (path, n)
        for path in library_files()
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.ClassDef)
    }


def _created(cls: ast.ClassDef, classes: Dict[str, Tuple[Path, ast.ClassDef]]) -> Set[str]:
    """Attributes the class body declares or a constructor sets, in the class or its library base classes."""
    declared = {
        t.id
        for n in cls.body
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Name)
    }
    methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    created = declared.union(*(_self_assignments(m) for m in methods if m.name in CONSTRUCTORS))
    for base in cls.bases:
        name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
        if name in classes and classes[name][1] is not cls:
            created |= _created(classes[name][1], classes)
    return created


def late_attributes() -> List[str]:
    """Attributes a method sets that neither a constructor nor the class body (fields) creates."""
    classes, found = _classes(), []
    for path, cls in classes.values():
        created = _created(cls, classes)
        for m in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if m.name not in CONSTRUCTORS:
                found += [f"{path.name}: {cls.name}.{a} first set in {m.name}" for a in _self_assignments(m) - created]
    return sorted(found)


def test_no_library_function_is_longer_than_60_lines():
    offenders = [f for path in library_files(include_demo=False) for f in long_functions(path)]
    assert not offenders, "\n".join(offenders)


def test_no_attribute_is_first_set_outside_the_constructor():
    offenders = late_attributes()
    assert not offenders, "\n".join(offenders)
