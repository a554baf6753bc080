"""The package's plan: imports form no circle and no module uses another's private names.

The import graph is built from the source with `ast`: every `import` and `from ... import`
statement, at module level or inside a function, is an edge from the importing module to the
imported module (`from pkg import name` points at `pkg.name` when that is a module). A package's
`__init__` is a module like any other. Private means a name starting with one underscore
(dunders are public protocol).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qdlm_jax"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(files: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges between the package's own modules, and the private-name imports found."""
    graph: dict[str, set[str]] = {m: set() for m in files}
    private: list[str] = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        module_aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in files:
                        graph[module].add(alias.name)
                        module_aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in files:
                        graph[module].add(sub)
                        module_aliases[alias.asname or alias.name] = sub
                    elif target in files:
                        graph[module].add(target)
                        if _is_private(alias.name) and target != module:
                            private.append(f"{module} imports {target}.{alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and _is_private(node.attr)
                    and module_aliases[node.value.id] != module):
                private.append(f"{module} uses {module_aliases[node.value.id]}.{node.attr}")
        graph[module].discard(module)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph, _ = import_graph(module_files())
    assert cycles(graph) == []


def test_no_private_name_crosses_a_module_boundary():
    _, private = import_graph(module_files())
    assert private == []


def test_checker_sees_a_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n")
    (pkg / "c.py").write_text("from pkg.a import _hidden\nimport pkg.a as a\nx = a._other\n")
    graph, private = import_graph(module_files(tmp_path, "pkg"))
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert private == ["pkg.c imports pkg.a._hidden", "pkg.c uses pkg.a._other"]


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_order(text: str | None = None) -> list[set[str]]:
    """The folders' order as docs/architecture.md states it, on its one line
    `commands -> jobs -> {checkpoints, ...} -> ... -> {errors, fsutil}`: the top first."""
    text = ARCHITECTURE.read_text() if text is None else text
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("commands ->"))
    return [set(part.strip(" {}").replace(" ", "").split(",")) for part in line.split("->")]


def layer_of(module: str, order: list[set[str]]) -> int | None:
    """A module's layer (0 = top); the root package `qdlm_jax` is above every layer (-1), the
    command-line entry points (`cli`, `__main__`) are commands."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    top = {"cli": "commands", "__main__": "commands"}.get(parts[1], parts[1])
    return next((i for i, names in enumerate(order) if top in names), None)


def upward_arrows(graph: dict[str, set[str]], order: list[set[str]]) -> list[str]:
    """Every import from a layer to one above it (or to the root package), and every module
    in no layer."""
    wrong = []
    for module, targets in graph.items():
        here = layer_of(module, order)
        if here is None:
            wrong.append(f"{module} is in no layer of docs/architecture.md")
            continue
        for t in targets:
            there = layer_of(t, order)
            if there is not None and there < here:
                wrong.append(f"{module} -> {t}")
    return sorted(wrong)


def test_arrows_run_one_way():
    """The import graph has no arrow up between the folders, in the order the architecture
    page states."""
    order = layer_order()
    assert {"commands", "jobs", "quant", "models", "errors"} <= set().union(*order)
    graph, _ = import_graph(module_files())
    assert upward_arrows(graph, order) == []


def test_checker_sees_an_upward_arrow():
    order = layer_order("    commands -> jobs -> {quant, data} -> {models} -> {errors}\n")
    graph = {"qdlm_jax.quant.x": {"qdlm_jax.jobs.y", "qdlm_jax.models.z"},
             "qdlm_jax.models.z": {"qdlm_jax"}, "qdlm_jax.odd": set()}
    assert upward_arrows(graph, order) == ["qdlm_jax.models.z -> qdlm_jax",
                                           "qdlm_jax.odd is in no layer of docs/architecture.md",
                                           "qdlm_jax.quant.x -> qdlm_jax.jobs.y"]
