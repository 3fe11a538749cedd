"""The import graph of src/spdinv (every import, also those inside functions): no circle, and no
module imports from a layer above its own (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "spdinv"

# Lowest first. A module belongs to the layer with the longest matching prefix (names relative to spdinv).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "arguments", "images", "inputs", "outputs", "masks", "schedule", "families",
                    "prediction", "conditioning", "concepts", "presets")),
    ("model", ("loading", "model", "textual_inversion", "elite")),
    ("sampling", ("sampling",)),
    ("inversion", ("inversion", "plots", "export")),
    ("editing", ("editing",)),
    ("world", ("world", "world.concept_encoder", "world.concept_training", "testing")),
    ("bench", ("bench",)),
    ("commands", ("commands", "demo")),
    ("cli", ("cli", "__main__")),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The spdinv modules (relative names) `path` imports, with the packages that importing them
    runs (importing a.b.c runs a.b's __init__ unless the importer is inside a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("spdinv"):
                module = node.module.removeprefix("spdinv").lstrip(".")
            else:
                continue
            targets = [module] + [f"{module}.{alias.name}".lstrip(".") for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("spdinv").lstrip(".") for a in node.names if a.name.startswith("spdinv")]
        for target in targets:
            if target not in modules:
                continue
            found.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if not (name == parent or name.startswith(parent + ".")):
                    found.add(parent)
    found.discard(name)
    found.discard("")  # the root package's __init__ imports nothing
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imports_of(path, name, set(paths)) for name, path in paths.items()}


def layer_of(name: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if name == "":
        return 0
    if level is None:
        raise AssertionError(f"spdinv.{name} is in no layer: add it to LAYERS (and docs/architecture.md)")
    return level


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_upward_import():
    upward = [f"spdinv.{a} ({LAYERS[layer_of(a)][0]}) imports spdinv.{b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(import_graph().items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert upward == []


def test_every_module_has_a_layer():
    for name in import_graph():
        layer_of(name)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    """A model-layer module importing the CLI inside a function is both a circle and upward."""
    package = tmp_path / "spdinv"
    (package / "editing").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("from . import model\n")
    (package / "model.py").write_text("def f():\n    from .cli import main\n")
    (package / "editing" / "__init__.py").write_text("")
    (package / "editing" / "p2p.py").write_text("from spdinv.model import f\n")
    graph = import_graph(package)
    assert graph["model"] == {"cli"} and cycles(graph) == [["cli", "model"]]
    assert graph["editing.p2p"] == {"model"}
    assert layer_of("model") < layer_of("cli")
