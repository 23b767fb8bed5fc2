"""The package's structure, checked: no import cycles, lower layers never reach up, short functions.

Every ``import`` and ``from ... import`` inside ``lowbw/`` is read from the source (function-level ones
included, since they form cycles just the same), resolved to a module of the package, and:

- the graph of module -> imported module has no cycle;
- every package of lowbw/ is listed in pyproject.toml (a regular, non-editable install is whole);
- no module of the lower layers (net, compress, boundary, models, data, metrics, pipeline, energy) imports the
  layers above them: the rank runtime, the launcher, the entry points (train, simulate) or reports.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import lowbw

ROOT = Path(lowbw.__file__).parent
LOWER = ("net", "compress", "boundary", "models", "data", "metrics", "pipeline", "energy", "replicas")
UPPER = ("lowbw.rank", "lowbw.launch", "lowbw.train", "lowbw.simulate", "lowbw.report")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an imported name lives in (``lowbw.a.b.c`` -> ``lowbw.a.b`` if c is not a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            if t.startswith("lowbw"):
                mod = _resolve(t, modules)
                if mod and mod != name and not name.startswith(mod + "."):  # a submodule importing its package
                    found.add(mod)
    return found


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if colour.get(m) is None and (found := visit(m)):
                return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(g):
        if colour.get(n) is None and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_among_lowbw_modules():
    cycle = _cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_never_import_the_runtime_launcher_entry_points_or_reports():
    bad = []
    for name, deps in graph().items():
        if name.split(".")[1:2] and name.split(".")[1] in LOWER:
            bad += [f"{name} imports {d}" for d in deps if d.startswith(UPPER)]
    assert not bad, "; ".join(bad)


def test_config_is_a_leaf():
    deps = graph()["lowbw.config"]
    assert deps <= {"lowbw.errors"}, f"lowbw.config imports {sorted(deps)}"


#: Functions allowed past MAX_LINES, each with the reason (none today).
LONG_FUNCTIONS: dict[str, str] = {}
MAX_LINES = 80


def test_no_function_in_lowbw_is_longer_than_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if lines > MAX_LINES and key not in LONG_FUNCTIONS:
                    long.append(f"{key} ({lines} lines)")
    assert not long, "functions longer than 80 lines: " + ", ".join(sorted(long))


def test_pyproject_lists_every_package_so_a_regular_install_is_whole():
    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {_module_name(p) for p in ROOT.rglob("__init__.py")}
    assert present - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"


#: Calls that unpickle bytes (which may come from another process): none in the library.
UNPICKLING = ("pickle.load", "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
              "recv_object_list", "torch.load(")


def test_nothing_in_lowbw_unpickles_what_another_process_sent():
    found = []
    for name, path in _modules().items():
        if name.startswith("lowbw.testing"):  # checks only, never part of a run
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for call in UNPICKLING:
                if call in code and not (call == "torch.load(" and "weights_only=True" in code):
                    found.append(f"{name}:{i}: {line.strip()}")
    assert not found, "; ".join(found)
