"""The top of the house imports one way: nothing imports the CLI, and the CLI, experiments, reproduce, the bench
commands and the reports are in no import circle (an AST scan of every import, those inside functions included)."""

from __future__ import annotations

from pathlib import Path

from test_layers import PKG, imported_modules

TOP = ("apart_fast.cli", "apart_fast.experiments", "apart_fast.reproduce", "apart_fast.bench", "apart_fast.report")


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a module counts as that module)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    return {mod: {owner(m) for m in imported_modules(path, root) if m.startswith("apart_fast")} - {mod, ""}
            for mod, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each a set of modules importing each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_nothing_imports_the_cli() -> None:
    assert [m for m, deps in import_graph().items() if "apart_fast.cli" in deps] == ["apart_fast.__main__"]


def test_the_top_modules_are_in_no_import_circle() -> None:
    tangled = [c for c in circles(import_graph()) if any(m == t or m.startswith(t + ".") for m in c for t in TOP)]
    assert tangled == []


def test_circles_finds_a_circle() -> None:
    """The check above can fail: a circle through three modules is found, a one-way chain is not."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
