"""The README's benchmark table is what ``bench/readme_table.py`` makes of the recorded benchmark output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def table_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "bench" / "readme_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_generated_from_the_recorded_benchmark_output() -> None:
    tool = table_tool()
    records = [json.loads(line) for line in tool.RECORD.read_text().splitlines()]
    assert records, "bench/figures.jsonl records no run"
    benches_seen: set[str] = set()
    for record in records:  # every figure follows the facts of the machine its benchmark ran on
        if record["kind"] == "machine":
            assert {"cpu", "cores", "load", "date", "command"} <= record.keys()
            benches_seen.add(record["bench"])
        else:
            assert record["bench"] in benches_seen and {"name", "value", "unit", "load"} <= record.keys()
    assert benches_seen <= set(tool.BENCHES)
    readme = (ROOT / "README.md").read_text()
    assert tool.readme_block(readme) == tool.render(records), "run `python bench/readme_table.py --write`"


def test_figures_are_read_from_a_scripts_output() -> None:
    tool = table_tool()
    output = ["some human line", 'FIGURE {"bench": "x", "kind": "figure", "name": "n", "value": 1.5}', "FIGURE{}"]
    assert tool.figures_in(output) == [{"bench": "x", "kind": "figure", "name": "n", "value": 1.5}]
