"""The layout is the architecture: shared code imports no service and reads no service's internals, edges never
import the processor, and no two packages import each other (directly or around a circle)."""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "spendstream"

# package -> packages it must never import
FORBIDDEN = {
    "core": ("edge", "gateway", "processor", "sink", "api", "analytics", "runtime"),
    "edge": ("processor", "gateway", "sink", "api", "analytics"),
    "gateway": ("processor", "sink", "api", "analytics"),
    "processor": ("edge", "gateway", "sink", "api", "analytics"),
    "sink": ("edge", "gateway", "processor", "api"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


PACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def package_imports(root: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """``{package: {imported package: [files]}}`` between the packages of ``root``, lazy imports included."""
    graph: dict[str, dict[str, list[str]]] = {name: {} for name in PACKAGES}
    for name in PACKAGES:
        for path in sorted((root / name).rglob("*.py")):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] == "spendstream" and len(parts) > 1 and parts[1] in graph and parts[1] != name:
                    graph[name].setdefault(parts[1], []).append(str(path.relative_to(root)))
    return graph


def import_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every circle of imports between packages, each found once from its smallest member."""
    cycles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append([*path, start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return cycles


def test_no_import_cycle_between_packages() -> None:
    graph = package_imports()
    cycles = import_cycles(graph)
    described = [
        " -> ".join(cycle) + ": " + "; ".join(f"{a} -> {b} in {', '.join(graph[a][b])}" for a, b in pairwise(cycle))
        for cycle in cycles
    ]
    assert not cycles, "\n".join(described)


def test_cycle_finder_sees_a_circle_through_three_packages() -> None:
    graph = {"a": {"b": ["a/x.py"]}, "b": {"c": ["b/y.py"]}, "c": {"a": ["c/z.py"]}, "d": {"a": ["d/w.py"]}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]


def _instance_state(paths: list[Path]) -> set[str]:
    """Attributes that classes in ``paths`` keep on ``self``."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return names


def _defined_names(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def service_internals_read_by_core(root: Path = PACKAGE) -> list[str]:
    """Reads in ``core`` of an attribute that only a service keeps on its objects (``gateway.upstreams``), on an
    object core does not type (an ``Any`` or unannotated parameter, a local): duck typing into a service."""
    core = sorted((root / "core").rglob("*.py"))
    services = [path for name in PACKAGES if name != "core" for path in sorted((root / name).rglob("*.py"))]
    internal = _instance_state(services) - _defined_names(core)
    found = []
    for path in core:
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            typed = {  # the typed parameters of the function and of those nested in it
                arg.arg
                for inner in ast.walk(func)
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef)
                for arg in (*inner.args.posonlyargs, *inner.args.args, *inner.args.kwonlyargs)
                if arg.annotation is not None and ast.unparse(arg.annotation) not in ("Any", "object")
            }
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.ctx, ast.Load)
                    and node.attr in internal
                    and _root(node) not in typed | {"self", "cls"}
                ):
                    found.append(f"{path.relative_to(root)}:{node.lineno} reads .{node.attr}")
    return sorted(set(found))


def test_core_reads_no_service_internals() -> None:
    """Each service exposes its own metrics and state; core offers protocols and registries they use."""
    offenders = service_internals_read_by_core()
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for module in _imports(path):
            for banned in FORBIDDEN[package]:
                if module == f"spendstream.{banned}" or module.startswith(f"spendstream.{banned}."):
                    offenders.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_public_api_names_resolve() -> None:
    import spendstream

    for name in ("UsageEvent", "Decision", "Settings"):
        assert getattr(spendstream, name).__name__ == name
    with pytest.raises(AttributeError):
        _ = spendstream.NoSuchThing


def test_every_lazy_export_is_listed_and_importable() -> None:
    import spendstream

    assert sorted(spendstream._EXPORTS) == sorted(spendstream.__all__)
    for name in spendstream.__all__:
        assert getattr(spendstream, name) is not None
