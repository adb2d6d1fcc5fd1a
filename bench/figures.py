"""What every benchmark prints about its run, in a form ``bench/readme_table.py`` reads back.

``machine()`` prints the CPU model, the load average, the date and the host's speed at the moment (a fixed
workload's time) once; ``figure()`` prints one measured figure
per line as ``FIGURE {json}``, beside the human-readable output, so the README's table is regenerated from the
scripts' own output rather than copied by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from machine_facts import cpu_model, reference_ms

PREFIX = "FIGURE "


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine(bench: str) -> None:
    """The run's facts: figures are only comparable on the same machine under similar load."""
    facts = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load": load_average(),
        "date": datetime.now(UTC).isoformat(),
        "reference_ms": reference_ms(),
    }
    print(
        f"cpu: {facts['cpu']} ({facts['cores']} cores); load average {facts['load']}; {facts['date'][:16]} UTC; "
        f"reference workload {facts['reference_ms']} ms (machine_facts.reference_ms: lower is a quicker host)"
    )
    print(PREFIX + json.dumps({"bench": bench, "kind": "machine", **facts}), flush=True)


def figure(bench: str, name: str, value: float, unit: str, baseline: float | None = None, **extra: object) -> None:
    """One figure (``baseline``: its peer measured in the same run), with the load average when it was taken."""
    record = {"bench": bench, "kind": "figure", "name": name, "value": round(value, 4), "unit": unit}
    if baseline is not None:
        record["baseline"] = round(baseline, 4)
    record.update(extra)
    record["load"] = load_average()
    record["reference_ms"] = reference_ms(3)  # the host's speed when the figure was taken
    print(PREFIX + json.dumps(record), flush=True)


def checkout_services(rev: str, into: Path) -> Path:
    """``services/`` (and ``schemas/``) of this repository at ``rev``, extracted under ``into``."""
    into.mkdir(parents=True)
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "services", "schemas"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "services"
