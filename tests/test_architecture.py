"""The package's shape: no import cycle between memprune modules, no module over 450 lines, no reference to a
design document that users of the repository do not have."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memprune"
MAX_LINES = 450
# Spelled in two pieces so that this file does not cite the document it forbids.
FORBIDDEN_DOCUMENT = "DESIGN" + ".md"
SCANNED = ["memprune", "tests", "bench", "scripts", "notebooks", "docs", "README.md", "ARCHITECTURE.md", "Makefile",
           "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".ipynb", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".json", ""}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """memprune/testbed/train.py -> memprune.testbed.train; a package's __init__.py is the package itself."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST):
    """Every import statement, at module level or inside functions and classes, except under `if TYPE_CHECKING:`
    (never executed, so it cannot form a cycle at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of `from <node.module> import ...`, relative levels resolved against the importer."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dynamic_imports(importer: str, is_package: bool, node: ast.Call, modules: dict[str, Path]) -> set[str]:
    """importlib.import_module("memprune.x") by its literal, and import_module(f"{__name__}.{name}") in a
    package (a registry importing its plug-ins) as an import of every direct submodule of that package."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not node.args:
        return set()
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {arg.value}
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.FormattedValue) \
            and getattr(arg.values[0].value, "id", None) == "__name__":
        package = importer if is_package else importer.rpartition(".")[0]
        return {m for m in modules if m.rpartition(".")[0] == package}
    return set()


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of its code)."""
    modules = package_modules(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(importer, is_package, node)
                targets.add(source)
                # `from .pkg import sub` imports the submodule pkg.sub when there is one.
                targets.update(f"{source}.{alias.name}" for alias in node.names)
            else:
                targets.update(_dynamic_imports(importer, is_package, node, modules))
        graph[importer] = {t for t in targets if t in modules and t != importer and t.split(".")[0] == top}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For each strongly connected component with more than one module (Tarjan), a shortest cycle
    (a -> ... -> a) through each of its modules, without repeats: enough to see every edge to cut."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles: list[list[str]] = []
    for component in components:
        for start in component:
            cycle = _cycle_through(start, set(component), graph)
            rotations = {tuple(cycle[i:-1] + cycle[:i] + [cycle[i]]) for i in range(len(cycle) - 1)}
            if not any(tuple(known) in rotations for known in cycles):
                cycles.append(cycle)
    return cycles


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from `start` back to itself, staying inside its component `members`."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    return paths[node] + [start]
                if succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def test_cycle_finder_on_a_toy_package(tmp_path):
    """Relative imports, imports inside functions, `from . import sub` and a registry's dynamic imports count;
    TYPE_CHECKING imports and third-party imports do not."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import thing\n",
        "b.py": "def f():\n    from . import c\n",
        "c.py": "import toy.a\nimport numpy\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import x\n",
        "e.py": "from .d import y\n",
        "sub/__init__.py": "import importlib\nfor n in ['p']:\n    importlib.import_module(f'{__name__}.{n}')\n",
        "sub/p.py": "from .. import sub\n",
        "sub/q.py": "from ..sub import p\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["toy.b"] == {"toy", "toy.c"}
    assert graph["toy.d"] == set() and graph["toy.e"] == {"toy.d"}
    assert graph["toy.sub.q"] == {"toy.sub", "toy.sub.p"}
    cycles = import_cycles(graph)
    assert ["toy.a", "toy.b", "toy.c", "toy.a"] in cycles
    assert ["toy.sub", "toy.sub.p", "toy.sub"] in cycles
    assert len(cycles) == 3  # a->b->c->a, sub->p->sub, sub->q->sub


def test_no_import_cycle_between_memprune_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_is_longer_than_the_limit():
    lengths = {module_name(path): len(path.read_text().splitlines()) for path in package_modules().values()}
    too_long = {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def _text_files(entry: str):
    path = ROOT / entry
    candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix in TEXT_SUFFIXES and "__pycache__" not in candidate.parts:
            yield candidate


@pytest.mark.parametrize("entry", SCANNED)
def test_no_reference_to_an_unpublished_design_document(entry):
    citing = [str(path.relative_to(ROOT)) for path in _text_files(entry)
              if FORBIDDEN_DOCUMENT in path.read_text(errors="replace")]
    assert not citing, f"files citing {FORBIDDEN_DOCUMENT}: {citing}"
