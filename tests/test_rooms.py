"""Each module is a room that says what it holds, and the rooms lean on each other one way only.

The check reads the source (``ast``, nothing is imported): every ``import attncontrol.x`` and ``from .x import y``
/ ``from ..x import y`` in a module, at module level, under ``if TYPE_CHECKING:`` and inside functions alike (a
function-level import only hides a cycle until the function runs), is an edge to the module it names. The graph
of those edges must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attncontrol"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imported(node: ast.AST, package: str, modules: dict[str, Path]) -> list[str]:
    """The intra-package modules one import statement names (``from X import y`` names ``X.y`` when that is a
    module, else ``X``)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
    found = []
    for name in names:
        while name not in modules and "." in name:  # `import attncontrol.x.Name`-like forms: the module part
            name = name.rpartition(".")[0]
        if name in modules:
            found.append(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` for the package at ``root``, from its source."""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _imported(node, package, modules):
                if target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, no recursion)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return "\n".join(f"  {a} -> {b} (line {graph[a][b]} of {a})" for a, b in zip(cycle, cycle[1:]))


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in attncontrol:\n" + _describe(cycle, graph)


def test_the_graph_sees_every_kind_of_import():
    """Not vacuous: the edges the rooms rely on are seen, module-level and function-level, relative and absolute."""
    graph = import_graph()
    assert "attncontrol.scores.pretrained" in graph["attncontrol.eval"]  # module level, `from .scores.pretrained`
    assert "attncontrol.scores.pretrained" in graph["attncontrol.scores.models"]  # `from .pretrained`, same package
    assert "attncontrol.scores.models" in graph["attncontrol.eval"]  # inside evaluate()
    assert "attncontrol.eval" in graph["attncontrol.scores.export"]  # `from ..eval` inside a function
    assert "attncontrol.checkpointing" in graph["attncontrol.guidance"]


def test_a_cycle_is_found_and_named(tmp_path):
    """A function-level import back from a leaf is a cycle, and the message names both edges."""
    pkg = tmp_path / "attncontrol"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n    return g\n")
    (pkg / "top.py").write_text("import attncontrol.sub.leaf\n\ndef g():\n    pass\n")
    graph = import_graph(pkg)
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"attncontrol.sub.leaf", "attncontrol.top"}
    assert "attncontrol.sub.leaf -> attncontrol.top (line 2" in _describe(cycle, graph)
    (pkg / "sub" / "leaf.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


MAX_FUNCTION_LINES = 60


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (methods included) longer than ``limit`` lines, ``def`` to last line, whose docstring does not
    say why (the words "is long because")."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit and "is long because" not in (ast.get_docstring(node) or ""):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_60_lines_without_saying_why():
    assert long_functions() == []


def test_a_long_function_is_found(tmp_path):
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    (tmp_path / "ok.py").write_text(f'def said():\n    """It is long because a table is."""\n{body}\n')
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
