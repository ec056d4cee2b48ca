"""The package graph: imports run one way (model ← live ← signaling ← cluster ← cli; train → model) and no module is part of
an import cycle. Every import statement counts — module-level, inside functions, under ``TYPE_CHECKING``, absolute
and relative — read with ``ast`` from the source, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what each top-level package may import of ours (web/ holds the static pages, read by signaling/ and cli/)
ALLOWED = {
    "model": {"model"},
    "live": {"model", "live"},
    "signaling": {"model", "live", "signaling", "web"},
    "cluster": {"model", "live", "signaling", "cluster"},
    "train": {"model", "train"},
    "web": {"web"},
    "cli": {"model", "live", "signaling", "cluster", "train", "web", "cli"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name → source file, for every module of our packages (a package is its ``__init__``)."""
    out = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` names: itself, or its longest prefix that is one (a name
    imported from a package); None for anything not ours."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # ``from X import y`` imports X, and X.y too when that is a module
            names += [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    targets = {t for t in (_resolve(n, modules) for n in names) if t is not None} - {module}
    # importing a.b.c runs a and a.b first; a module's own packages are already running when it does
    own = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)}
    parents = {".".join(t.split(".")[:n]) for t in targets for n in range(1, t.count(".") + 1)}
    return targets | (parents - own)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(m, path, modules) for m, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_relative_function_level_and_type_checking_imports():
    graph = _graph()
    assert "model.attention" in graph["model.dit"]  # from .attention import …
    assert "train.runner" in graph["cli.main"]  # inside _cmd_train_tiny / build_parser
    assert "train.profile" in graph["cli.main"]  # under TYPE_CHECKING (and in a function)
    assert "web" in graph["signaling.http"]  # import web as web_assets (aiohttp's web is not ours)


def test_each_package_imports_only_the_layers_it_builds_on():
    upward = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                    if t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not upward, "imports against the layering (model ← live ← signaling ← cluster ← cli; train → model):\n" + "\n".join(
        upward)


def test_no_module_is_part_of_an_import_cycle():
    assert not _cycles(_graph())


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
