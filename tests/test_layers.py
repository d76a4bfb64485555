"""Layers import one way: every import in studio/ and app.py, read with `ast`, points down.

The order, lowest first (README, "How the code is laid out"):
foundation (studio.paths, config, runs, heavy, and any other top-level module of studio/)
-> data, models -> hardware -> train -> chat, export, plots -> tools -> ui -> app.

Imports inside functions count (a lazy import is still a dependency: nanochat/LLaMA-Factory
habit 14 in STYLE.md), and so do `if TYPE_CHECKING:` ones. Command entry points sit on top
with app.py: every `__main__.py` (`studio/hardware/calibrate/__main__.py` keeps `python -m
studio.hardware.calibrate` running the tool), and the thin shims `studio.bench` and
`studio.doctor`, kept only so that `python -m X` still works after the code moved to
`studio.tools`.
Besides an upward import, a circle fails: modules that import each other, or two packages
of the same layer that do (chat -> export -> chat), even when each import alone points
sideways.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (layer name, module prefixes); a module belongs to the longest prefix it starts with.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("studio",)),
    ("data, models", ("studio.data", "studio.models")),
    ("hardware", ("studio.hardware",)),
    ("train", ("studio.train",)),
    ("chat, export, plots", ("studio.chat", "studio.export", "studio.plots")),
    ("tools", ("studio.tools",)),
    ("ui", ("studio.ui",)),
    ("app", ("app",)),
]
# Thin command shims: `python -m <name>` keeps working after the code moved (top layer).
COMMAND_SHIMS = {"studio.bench", "studio.doctor"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    files = [*sorted((ROOT / "studio").rglob("*.py")), ROOT / "app.py"]
    return {module_name(p): p for p in files}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported studio module, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from studio import runs` imports the module studio.runs; `from x import name`, x
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the deepest known module named; a parent package is imported anyway
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add((target, node.lineno))
    return sorted(found, key=lambda hit: (hit[1], hit[0]))


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, unit): the unit is the stage package, or the top-level module itself."""
    if name.endswith("__main__") or name in COMMAND_SHIMS:
        return len(LAYERS) - 1, name
    best = (-1, "", 0)
    for index, (_label, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[2]:
                best = (index, prefix, len(prefix))
    index, prefix, _ = best
    assert index >= 0, f"{name}: in no layer; add it to LAYERS in {Path(__file__).name}"
    unit = name if prefix == "studio" else prefix
    return index, unit


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = source_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _where(graph: dict[str, list[tuple[str, int]]], group: list[str], unit_of) -> list[str]:
    members = set(group)
    return [
        f"{src}:{line} -> {dst}"
        for src, targets in sorted(graph.items())
        for dst, line in targets
        if unit_of(src) in members and unit_of(dst) in members and unit_of(src) != unit_of(dst)
    ]


def test_no_import_goes_up_a_layer() -> None:
    graph = import_graph()
    upward = []
    for src, targets in sorted(graph.items()):
        low, _ = layer_of(src)
        for dst, line in targets:
            high, _ = layer_of(dst)
            if high > low:
                upward.append(f"{src}:{line} ({LAYERS[low][0]}) imports {dst} ({LAYERS[high][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    graph = import_graph()
    by_module: dict[str, set[str]] = defaultdict(set)
    by_unit: dict[str, set[str]] = defaultdict(set)
    for src, targets in graph.items():
        for dst, _line in targets:
            by_module[src].add(dst)
            if layer_of(src)[1] != layer_of(dst)[1]:
                by_unit[layer_of(src)[1]].add(layer_of(dst)[1])
    problems = []
    for group in circles(by_module):
        problems.append("modules " + " <-> ".join(group))
        problems += ["  " + e for e in _where(graph, group, lambda m: m)]
    for group in circles(by_unit):
        problems.append("packages " + " <-> ".join(group))
        problems += ["  " + e for e in _where(graph, group, lambda m: layer_of(m)[1])]
    assert not problems, "import circles:\n" + "\n".join(problems)


def test_the_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The reader itself: an import inside a function and a relative one are both found."""
    pkg = tmp_path / "studio" / "chat"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    code = "def f():\n    from studio.train import jobs\n\nfrom ..export import run\n"
    (pkg / "engine.py").write_text(code, encoding="utf-8")
    known = {"studio.chat", "studio.train", "studio.train.jobs", "studio.export.run"}
    found = imports_of("studio.chat.engine", pkg / "engine.py", known)
    assert ("studio.train.jobs", 2) in found
    assert ("studio.export.run", 4) in found
