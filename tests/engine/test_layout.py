"""The engine's layout: packages by stage, each with its purpose at the top, and no import cycle.

Imports are read from the source (every `import`, module-level or inside a function: a lazy import that closes
a cycle is still a cycle, only a hidden one). A package's own `__init__` is not counted as imported by its
submodules (Python loads it first, but it is not a dependency of theirs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "dinomix"
STAGES = ("cli", "preprocessing", "nets", "inference", "training", "evaluation", "methods")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ENGINE.rglob("*.py") if p.name != "__main__.py"}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The engine modules `name` imports (resolved relative imports; `from pkg import sub` counts sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_engine_has_no_import_cycle():
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = _imports(name, path, known)
        # a submodule does not depend on its own package's __init__ (Python loads it first, that is all)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    assert _cycles(graph) == []


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_package_whose_modules_say_what_they_are_for(stage):
    package = ENGINE / stage
    assert (package / "__init__.py").is_file(), f"dinomix/{stage}/ is not a package"
    for path in sorted(package.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and doc.strip(), f"{path.relative_to(ENGINE.parent)} has no purpose docstring at the top"


def test_no_command_module_is_left_at_the_top_level():
    assert sorted(p.name for p in ENGINE.glob("*_cli.py")) == []


def test_every_command_is_registered_from_the_cli_package():
    from dinomix.cli.main import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    registered = set(sub.choices)
    assert {m.__name__.rsplit(".", 1)[1] for m in COMMANDS} == registered
    assert all(m.__name__.startswith("dinomix.cli.") for m in COMMANDS)


def test_plain_inference_imports_no_training_code():
    mods = _modules()
    known = set(mods)
    seen, todo = set(), ["dinomix.inference"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(m, mods[m], known))
    assert not {m for m in seen if m.startswith(("dinomix.training", "dinomix.methods", "dinomix.cli"))}


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (no packages under tests/): two test_x.py in different folders
    stop the whole run at collection."""
    names = [p.name for p in (ENGINE.parent / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
