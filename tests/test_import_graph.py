"""The shape of the code: no import cycles in dreamidv_core, and the top-level ``training`` package imported
only where it belongs (never by the core, of the nodes only by the training nodes).

The graph is read from the source with ``ast`` and counts every import, also those inside functions
(a cycle hidden behind a function-level import is still a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set


ROOT = Path(__file__).resolve().parent.parent
CORE = "dreamidv_core"
TRAINING_NODE_MODULES = {"nodes.training"}  # the only node modules that may import the training package


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path, modules: Set[str] = frozenset()) -> Set[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved. ``from a import b``
    counts ``a.b`` when that is one of ``modules`` (a submodule), else ``a``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                out.add(sub if sub in modules or not modules else mod)
                if not modules:
                    out.add(mod)
    return out


def import_graph(root: Path, package: str) -> Dict[str, Set[str]]:
    """module -> the modules of ``package`` it imports (edges to a package count as edges to its __init__)."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        graph[mod] = {m for m in imported_modules(path, root, set(files)) if m in files and m != mod}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _parent_package_edges(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """Add the implicit edge of importing ``a.b.c``: Python runs ``a/__init__`` and ``a/b/__init__`` first."""
    out = {k: set(v) for k, v in graph.items()}
    for mod, targets in graph.items():
        for t in targets:
            parts = t.split(".")
            for k in range(1, len(parts)):
                parent = ".".join(parts[:k])
                if parent in graph and parent != mod and not mod.startswith(parent + "."):
                    out[mod].add(parent)
    return out


def test_core_has_no_import_cycles():
    graph = _parent_package_edges(import_graph(ROOT, CORE))
    assert len(graph) > 40, "the core's modules were not found"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in dreamidv_core (also through imports inside functions): " + "; ".join(
        " <-> ".join(c) for c in cycles)


# The core's folders from the bottom up (dreamidv_core/__init__.py describes them): a module may import from its
# own folder and from the folders before it, never from one after it.
LAYERS = ("errors", "progress", "optional", "io", "models", "weights", "sampling", "parallel", "preprocess",
          "pipelines", "eval", "synthesis", "cli", "__main__")


def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    def layer(mod: str) -> str:
        parts = mod.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = layer(mod), layer(t)
            if a == b or a == "__init__":
                continue
            if a not in LAYERS or b not in LAYERS:
                bad.append(f"{mod} -> {t}: a folder not in LAYERS (add it where it belongs)")
            elif LAYERS.index(b) > LAYERS.index(a):
                bad.append(f"{mod} ({a}) imports {t} ({b}), a higher layer")
    return bad


def test_core_modules_import_only_lower_layers():
    assert layer_violations(import_graph(ROOT, CORE)) == []


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from .a import y\n    return y\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b"]]


def _importers_of(top: str, folders) -> Dict[str, Set[str]]:
    found = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            hits = {m for m in imported_modules(path, ROOT) if m == top or m.startswith(top + ".")}
            if hits:
                found[module_name(path, ROOT)] = hits
    return found


def test_core_never_imports_the_training_package():
    assert _importers_of("training", [CORE]) == {}


def test_only_the_training_nodes_import_the_training_package():
    # relative imports count too: ``from ..training import stages`` in nodes/ resolves to ``training.stages``
    importers = _importers_of("training", ["nodes"])
    assert set(importers) <= TRAINING_NODE_MODULES, importers


def sys_path_changes(path: Path) -> List[int]:
    """Lines of ``path`` that change ``sys.path`` (``sys.path.insert/append/extend/...`` or an assignment)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if isinstance(t, ast.Attribute)), None)
        if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                and target.value.id == "sys"):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_pack_never_changes_sys_path():
    files = [ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "training").rglob("*.py"),
             *(ROOT / CORE).rglob("*.py")]
    changes = {str(p.relative_to(ROOT)): sys_path_changes(p) for p in files}
    assert {k: v for k, v in changes.items() if v} == {}, "the pack must not change sys.path (it would shadow " \
                                                          "other packs' modules or be shadowed by them)"


def test_sys_path_change_finder(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""sys.path is fine in text."""\nimport sys\nsys.path.append("x")\nsys.path = []\nprint(sys.path)\n')
    assert sys_path_changes(f) == [3, 4]
