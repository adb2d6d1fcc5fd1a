"""Locating and parsing the Avro schemas in ``schemas/`` (the source of truth)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro


def schema_dir() -> Path:
    """``schemas/`` of a source checkout, or the copy packaged into an installed wheel."""
    checkout = Path(__file__).resolve().parents[3] / "schemas"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("spendstream") / "_schemas"))


@cache
def load_schema_json(name: str) -> dict[str, Any]:
    """The JSON of ``schemas/<name>.avsc`` (``history/usage_event.v1`` for older versions)."""
    return json.loads((schema_dir() / f"{name}.avsc").read_text())


@cache
def parsed_schema(name: str) -> dict[str, Any]:
    return fastavro.parse_schema(load_schema_json(name))


@cache
def wire_schema(name: str) -> dict[str, Any]:
    """The schema with logical types removed: identical bytes, plain longs and strings in Python."""

    def strip(node: Any) -> Any:
        if isinstance(node, list):
            return [strip(member) for member in node]
        if isinstance(node, dict):
            if "logicalType" in node and node.get("type") in ("long", "int", "string"):
                return node["type"]
            return {key: strip(value) for key, value in node.items()}
        return node

    return fastavro.parse_schema(strip(load_schema_json(name)))


def canonical_form(name: str) -> str:
    """The Avro Parsing Canonical Form, whose fingerprint identifies the schema on the wire."""
    from fastavro.schema import to_parsing_canonical_form

    return to_parsing_canonical_form(load_schema_json(name))


def history_versions(name: str) -> list[str]:
    """Names of every older version of a schema kept under ``schemas/history/``."""
    return sorted(f"history/{p.stem}" for p in (schema_dir() / "history").glob(f"{name}.v*.avsc"))
