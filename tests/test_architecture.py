"""The layout is the architecture: shared code imports no service, edges never import the processor."""

from __future__ import annotations

import ast
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
