"""vaelab's modules import each other without cycles, read from their source (every import
statement: at module level and inside functions, relative and absolute), so that a lazy import
does not hide one. `config` reads the component registries; no component imports `config`."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vaelab"
# The plotting modules' users: the command line, the report page and the TensorBoard callback.
MAY_IMPORT_PLOTS = {"vaelab.cli", "vaelab.report", "vaelab.tensorboard"}
COMPONENTS = ("likelihoods", "priors", "posteriors", "nets", "objectives", "presets", "registry")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The vaelab modules that module `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up one level per extra dot
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name`, pkg itself
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                    for a in node.names}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[str]:
    """Each strongly connected group of modules (Tarjan's algorithm), whose modules all import
    each other through the others: one cycle through it, and the group's other modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        path = path_around(group, edges)
        others = sorted(group - set(path))
        out.append(" -> ".join(path) + (f" (its group also holds {', '.join(others)})"
                                        if others else ""))
    return out


def path_around(group: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A cycle inside a strongly connected group, from its first module back to it."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_the_import_graph_is_read_from_every_module():
    edges = graph()
    assert {"vaelab.config", "vaelab.cli", "vaelab.data.folders"} <= set(edges)
    assert "vaelab.likelihoods" in edges["vaelab.config"]
    assert "vaelab.plots" in edges["vaelab.cli"]  # inside a function
    assert "vaelab.config" in edges["vaelab.data.folders"]  # `from ..config import`, in a function


def test_no_module_imports_itself_back():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_component_imports_config():
    edges = graph()
    wrong = {m for m in COMPONENTS if "vaelab.config" in edges.get(f"vaelab.{m}", ())}
    assert not wrong, f"these modules import vaelab.config: {', '.join(sorted(wrong))}"


def test_only_the_command_line_the_report_and_tensorboard_import_plots():
    edges = graph()
    wrong = {m for m, out in edges.items() if "vaelab.plots" in out} - MAY_IMPORT_PLOTS
    assert not wrong, f"these modules import vaelab.plots: {', '.join(sorted(wrong))}"
