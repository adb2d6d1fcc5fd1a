"""Policy validation time and memory for large policies, through ``spendstream policy validate``.

Each size runs the CLI as a subprocess (interpreter start and imports included) on a generated policy with
that many team budgets, three times; it prints the best wall time and the peak resident memory. Before the
linear loader, 120,000 budgets took 83 s and 1.25 GB.

    .venv/bin/python bench/bench_policy.py [budgets ...]      # default: 10000 100000
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_facts import cpu_model

SIZES = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
SPENDSTREAM = Path(sys.executable).with_name("spendstream")


def write_policy(path: Path, budgets: int) -> None:
    periods = ("day", "week", "month", "quarter", "rolling_24h")
    with path.open("w") as out:
        out.write("name: bench\ntimezone: Europe/Berlin\nbudgets:\n")
        for i in range(budgets):
            out.write(f"  - scope: team:t{i}\n    period: {periods[i % 5]}\n    amount_usd: {i % 5000 + 1}.25\n")


def validate(path: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KB) of one ``spendstream policy validate`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([str(SPENDSTREAM), "policy", "validate", str(path)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"validation failed: {done.stderr}")
    return elapsed, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> None:
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores); load average: {os.getloadavg()}")
    print(f"{'budgets':>9} {'best s':>8} {'peak MB':>8} {'us/budget':>10}")
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        for size in SIZES:
            path = Path(tmp) / f"policy-{size}.yaml"
            write_policy(path, size)
            runs = [validate(path) for _ in range(3)]
            best = min(seconds for seconds, _ in runs)
            peak_mb = max(kb for _, kb in runs) / 1024
            print(f"{size:9,} {best:8.2f} {peak_mb:8.0f} {best / size * 1e6:10.1f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
