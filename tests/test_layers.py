"""The house rules of `pipeline/`: packages that follow the data, imports that run one way, no cycle.

The import graph is read from the source with `ast` (every `import` and `from … import`, those inside
functions included), so a lazy import cannot hide a cycle or a backward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pipeline
from pipeline import LAYERS

ROOT = Path(pipeline.__file__).resolve().parent
TOP_MODULES = {"__init__.py", "cli.py"}  # the only modules directly under pipeline/


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (a `from pkg import name` counts as
    `pkg.name` when that is a module, else as `pkg`)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                if source.split(".")[0] != top:
                    continue
                for alias in node.names:
                    deps.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source)
        graph[name] = {d for d in deps if d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def backward_imports(graph: dict[str, set[str]], layers: tuple[str, ...]) -> list[str]:
    """Imports of a package later in `layers` from an earlier one. The top package itself (the
    version) is below every layer; `cli` is above them all and nothing imports it."""
    rank = {layer: i for i, layer in enumerate(layers)}
    top_rank, cli_rank = -1, len(layers)

    def rank_of(module: str) -> int:
        parts = module.split(".")
        if len(parts) == 1:
            return top_rank
        if parts[1] == "cli":
            return cli_rank
        return rank[parts[1]]

    return sorted(
        f"{module} imports {dep}"
        for module, deps in graph.items()
        for dep in deps
        if rank_of(dep) > rank_of(module)
    )


def test_no_import_cycle_in_pipeline():
    assert find_cycle(import_graph(ROOT)) is None


def test_imports_run_one_way_through_the_declared_layers():
    assert backward_imports(import_graph(ROOT), LAYERS) == []


def test_every_module_lives_in_a_declared_package_whose_docstring_names_its_role():
    entries = {p.name for p in ROOT.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert entries - packages - {"_bundled"} == TOP_MODULES  # no module outside a package but these
    assert packages == set(LAYERS)
    assert len(entries - TOP_MODULES) <= 10
    for package in packages:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 10, f"pipeline/{package}/__init__.py needs a docstring"


@pytest.fixture
def tree(tmp_path: Path):
    """A throwaway package `pkg` with layers `low` and `high`, modules written from a dict."""

    def write(files: dict[str, str]) -> Path:
        for name, source in {"pkg/__init__.py": "", **files}.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(source)
        return tmp_path / "pkg"

    return write


def test_the_checks_see_a_lazy_cycle_and_a_backward_import(tree):
    root = tree(
        {
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": "def f():\n    from pkg.high import b\n",
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "from pkg.low.a import f\n",
            "pkg/high/c.py": "from . import b\n",
        }
    )
    graph = import_graph(root)
    assert graph["pkg.high.c"] == {"pkg.high.b"}
    assert find_cycle(graph) == ["pkg.high.b", "pkg.low.a", "pkg.high.b"]
    assert backward_imports(graph, ("low", "high")) == ["pkg.low.a imports pkg.high.b"]
    assert backward_imports(graph, ("high", "low")) == ["pkg.high.b imports pkg.low.a"]


def test_a_one_way_tree_passes(tree):
    root = tree(
        {
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": "import pkg\n",
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "from pkg.low import a\n",
        }
    )
    graph = import_graph(root)
    assert find_cycle(graph) is None
    assert backward_imports(graph, ("low", "high")) == []
