"""The layers point one way: ``schemas`` and ``pipeline`` at the bottom, ``producer`` and
``deploy`` (provisioning, local stack, demo, the ``bucketlens`` CLI) on top; no import cycles.

The job runs on a cluster from the wheel: an import of ``deploy`` or ``producer`` from
``pipeline`` would drag the application layer (and its data files) onto every executor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "producer", "deploy", "schemas")
ALLOWED = {  # package -> project packages it may import
    "schemas": set(),
    "pipeline": {"pipeline", "schemas"},
    "producer": {"pipeline", "producer", "schemas"},
    "deploy": {"pipeline", "producer", "deploy", "schemas"},
}
DYNAMIC_IMPORTERS = {"__import__", "import_module", "add_lazy_command"}
# Inside ``pipeline``: the flat core modules (config, names, times, notifications, ...) at the
# bottom; ``model`` (the only room with torch) and ``bigquery`` on the core alone; ``stream``
# on those; ``commands`` on top. Each room's ``__init__`` says the same in words.
ROOMS = ("model", "bigquery", "stream", "commands")
ROOM_ALLOWED = {
    "core": {"core"},
    "model": {"core", "model"},
    "bigquery": {"core", "bigquery"},
    "stream": {"core", "model", "bigquery", "stream"},
    "commands": {"core", "model", "bigquery", "stream", "commands"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports_of(path: Path) -> set[str]:
    """Every project module this file imports when it runs: at the top, inside functions, or
    by name (imports for type checking only are not dependencies)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            if name in DYNAMIC_IMPORTERS:
                found |= {a.value for a in node.args
                          if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_layer_imports_only_the_layers_below_it(package: str) -> None:
    bad = {f"{name} imports {imp}"
           for name, path in project_modules().items() if name.split(".")[0] == package
           for imp in imports_of(path) if imp.split(".")[0] not in ALLOWED[package]}
    assert not bad, sorted(bad)


def room(module: str) -> str:
    """The room of a ``pipeline`` module: ``pipeline.stream.job`` → stream, ``pipeline.names`` →
    core (the package marker ``pipeline`` itself too)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "core"


def test_rooms_of_pipeline_import_only_the_rooms_below_them() -> None:
    modules = project_modules()
    assert {room(m) for m in modules if m.startswith("pipeline.")} == set(ROOM_ALLOWED)
    bad = {f"{name} ({room(name)}) imports {imp} ({room(imp)})"
           for name, path in modules.items() if name.split(".")[0] == "pipeline"
           for imp in imports_of(path)
           if imp.split(".")[0] == "pipeline" and room(imp) not in ROOM_ALLOWED[room(name)]}
    assert not bad, sorted(bad)


def test_room_of() -> None:
    assert [room(m) for m in ("pipeline", "pipeline.names", "pipeline.stream",
                              "pipeline.stream.job.BatchProcessor", "pipeline.commands.cli")] \
        == ["core", "core", "stream", "stream", "commands"]


def test_the_check_sees_a_late_and_a_by_name_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from deploy import localstack\n"
                 "add_lazy_command(sub, 'produce', 'producer.cli', 'a', 'b')\n"
                 "if TYPE_CHECKING:\n    from deploy import iam\n")
    assert {"deploy", "deploy.localstack", "producer.cli"} <= imports_of(f)
    assert "deploy.iam" not in imports_of(f)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path of module names, or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycles_among_project_modules() -> None:
    modules = project_modules()
    graph = {name: {i for i in imports_of(path) if i in modules and i != name}
             for name, path in modules.items()}
    # ``import pipeline`` from a submodule's package is the package marker, not a dependency
    graph = {n: {i for i in deps if not n.startswith(f"{i}.")} for n, deps in graph.items()}
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
