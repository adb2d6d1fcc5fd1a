"""The processor's dedup horizon (``AppliedIds``) alone: ids admitted per second and the memory they hold.

Stage 1 admits each batch's event ids (fresh 16-byte ids, batches of 5000, as a worker reads them) and keeps
every id within the horizon. Printed: ids/s through ``admit_versions``, and the process's RSS growth and peak
(VmHWM) growth for N ids held, per id. Run: ``.venv/bin/python bench/bench_dedup_horizon.py [--ids 2000000]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from machine_facts import cpu_model
from spendstream.processor.applied_ids import AppliedIds


def memory_mb() -> dict[str, int]:
    fields = ("VmRSS", "VmHWM")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in lines if line.startswith(fields)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_000_000)
    args = parser.parse_args()
    print(f"cpu: {cpu_model()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    gc.set_threshold(100_000, 50, 100)  # as the processor worker runs
    horizon = AppliedIds(3_600_000)
    before = memory_mb()
    elapsed = 0.0
    for start in range(0, args.ids, 5_000):
        batch = [(os.urandom(16), offset, offset + 1) for offset in range(start, start + 5_000)]
        began = time.perf_counter()
        horizon.admit_versions(batch)
        elapsed += time.perf_counter() - began
    after = memory_mb()
    held, peak = after["VmRSS"] - before["VmRSS"], after["VmHWM"] - before["VmHWM"]
    print(f"admit: {args.ids / elapsed:,.0f} ids/s ({elapsed / args.ids * 1e6:.2f} us per id)")
    print(
        f"memory for {len(horizon):,} ids: +{held} MB held ({held * 2**20 / args.ids:.0f} B/id), "
        f"+{peak} MB at the peak ({peak * 2**20 / args.ids:.0f} B/id)"
    )


if __name__ == "__main__":
    main()
