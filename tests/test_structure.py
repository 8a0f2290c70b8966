"""The package's shape, read from its source: no import cycle, short functions and modules, facts written once."""

import ast
import dataclasses
import functools
import pathlib
import re

import pytest

from cxrkeras import config

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cxrkeras"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# What config.py alone writes: each value may appear as a literal nowhere else in cxrkeras/.
FACTS = {"IMAGE_SIZE": 150, "VAL_FRACTION": 0.15, "AUDIT_BAND": 22}


@functools.cache
def modules():
    """{dotted name: (path, parsed tree)} of every module under cxrkeras/ (parsed once per session)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def imported(name, tree, known):
    """The cxrkeras modules that module `name` imports, at any depth of its code (function bodies too)."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from cxrkeras.x import y` imports cxrkeras.x.y when that is a module, else cxrkeras.x.
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {t for t in targets if t in known and t != name}


def cycles(graph):
    """Each strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_edge(a, b):
    """An import of a package's own __init__ by its submodule, or of a submodule by its package's __init__."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycle():
    found = modules()
    graph = {name: {t for t in imported(name, tree, found) if not package_edge(name, t)}
             for name, (_, tree) in found.items()}
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for name, (path, tree) in modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {lines}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length}")
    assert long_modules == [] and long_functions == []


def literal_places(value):
    """'module:line' of each number literal equal to `value` (bools excluded) outside config.py."""
    places = []
    for name, (_, tree) in modules().items():
        if name == "cxrkeras.config":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value:
                places.append(f"{name}:{node.lineno}")
    return places


@pytest.mark.parametrize("fact", sorted(FACTS))
def test_facts_are_written_once(fact):
    assert getattr(config, fact) == FACTS[fact]
    assert literal_places(FACTS[fact]) == []


def test_no_comparison_with_a_literal_threshold():
    """A decision `p > 0.5` reads config.DECISION_THRESHOLD (or a threshold handed in), never the literal."""
    places = []
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.Gt, ast.GtE)):
                right = node.comparators[0]
                if isinstance(right, ast.Constant) and right.value == config.DECISION_THRESHOLD:
                    places.append(f"{name}:{node.lineno}")
    assert places == []


def test_thresholds_have_one_name():
    """The stages' thresholds are `infected` and `covid` everywhere: never t_infected / t_covid."""
    old = re.compile(r"\bt_(infected|covid)\b|--t-(infected|covid)\b")
    spelled = [f"{path.name}:{i}" for path in sorted(PACKAGE.rglob("*.py"))
               for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if old.search(line)]
    assert spelled == []


@pytest.mark.parametrize("constant", ["EXAMPLE_IMAGE_FEATURE", "TUNERS", "SETTING_FIELDS", "DEFAULT_BAND"])
def test_named_constants_are_assigned_once(constant):
    places = [f"{name}:{node.lineno}" for name, (_, tree) in modules().items() for node in ast.walk(tree)
              if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == constant for t in node.targets)]
    assert len(places) <= 1, places


def test_one_image_size():
    """The image size is the model's: the data settings do not restate it."""
    assert "image_size" in {f.name for f in dataclasses.fields(config.ModelConfig)}
    assert "image_size" not in {f.name for f in dataclasses.fields(config.DataConfig)}
