"""The processor's dedup horizon (``AppliedIds``) alone: a full 15-minute horizon at 30 k events/s, held in the
process's memory or mostly on disk, and what an event's lookup costs in each.

Stage 1 admits each batch's event ids (fresh 16-byte ids, batches of 5000, as a worker reads them), 1 % of them
copies of ids applied earlier (at another offset: skipped as COPY), adopts the batch's ids record and expires
those past the horizon, with Kafka arrival times advancing as at ``--rate`` events/s. Each store runs in its own
process, so its RSS is its own: the runs in memory (the baseline: 40 bytes per id) and the runs spilled to
unlinked files (page cache, not the process). Printed per store: RSS growth per id held and at the peak (VmHWM),
and the admit cost per event (lookup of every id, copies included, and the bookkeeping around it).

Run: ``.venv/bin/python bench/bench_dedup_horizon.py [--ids 27000000] [--rate 30000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import figure, machine
from spendstream.processor.applied_ids import COPY, AppliedIds, Spill

BATCH = 5_000
COPIES_PER_BATCH = 50  # 1 %
SAMPLED_PER_BATCH = 4
STORES = {"memory": "runs in memory (baseline)", "disk": "runs spilled to disk"}


def memory_kb() -> dict[str, int]:
    fields = ("VmRSS", "VmHWM")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if line.startswith(fields)}


def measure(store: str, ids: int, rate: int, horizon_s: int) -> dict[str, float]:
    """Fill one store with ``ids`` fresh ids (plus 1 % copies) and return what it cost."""
    gc.set_threshold(100_000, 50, 100)  # as the processor worker runs
    spill = Spill(Path(tempfile.gettempdir())) if store == "disk" else Spill(at=2**62, max_run=4_194_304)
    horizon = AppliedIds(horizon_s * 1000, spill=spill)
    sample: list[bytes] = []  # earlier ids, to send copies of
    kept = SAMPLED_PER_BATCH * int(horizon_s * rate / BATCH * 0.9)
    chooser = random.Random(7)
    before = memory_kb()
    elapsed = 0.0
    copies = offset = 0
    for start in range(0, ids, BATCH):
        fresh = os.urandom(16 * BATCH)
        batch = [(fresh[i : i + 16], offset + n, n + 1) for n, i in enumerate(range(0, len(fresh), 16))]
        offset += BATCH
        if len(sample) >= 10 * COPIES_PER_BATCH:
            for event_id in chooser.sample(sample, COPIES_PER_BATCH):
                batch.append((event_id, offset, 1))
                offset += 1
        sample += [event_id for event_id, _, _ in batch[: BATCH : BATCH // SAMPLED_PER_BATCH]]
        del sample[:-kept]  # ids of the last 90 % of the horizon: copies hit the runs of every age
        arrival_ms = (start + BATCH) * 1000 // rate
        began = time.perf_counter()
        verdicts = horizon.admit_versions(batch)
        horizon.newest_ms = arrival_ms
        horizon.remember(f"ids#0#{batch[0][1]}", [arrival_ms], [(e, o) for e, o, _ in batch])
        horizon.expire()
        elapsed += time.perf_counter() - began
        copies += verdicts.count(COPY)
    after = memory_kb()
    events = offset
    return {
        "held_ids": len(horizon),
        "spilled_ids": horizon.spilled(),
        "rss_mb": after["VmRSS"] / 1024,
        "held_b_per_id": (after["VmRSS"] - before["VmRSS"]) * 1024 / len(horizon),
        "peak_b_per_id": (after["VmHWM"] - before["VmHWM"]) * 1024 / len(horizon),
        "peak_mb": after["VmHWM"] / 1024,
        "us_per_event": elapsed / events * 1e6,
        "copies_skipped": copies,
        "events": events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=27_000_000, help="fresh ids admitted (27 M: 15 min at 30 k/s)")
    parser.add_argument("--rate", type=int, default=30_000, help="events/s the arrival times advance at")
    parser.add_argument("--horizon-s", type=int, default=900)
    parser.add_argument("--store", choices=STORES, help=argparse.SUPPRESS)  # one store, in this process
    args = parser.parse_args()
    if args.store:
        print(json.dumps(measure(args.store, args.ids, args.rate, args.horizon_s)))
        return
    machine("dedup_horizon")
    results = {}
    for store, title in STORES.items():
        command = [sys.executable, __file__, "--store", store, *sys.argv[1:]]
        results[store] = found = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
        print(
            f"{title}: {found['held_ids']:,} ids held ({found['spilled_ids']:,} on disk), "
            f"RSS {found['rss_mb']:.0f} MB, +{found['held_b_per_id']:.1f} B/id held, "
            f"+{found['peak_b_per_id']:.1f} B/id at the peak; admit {found['us_per_event']:.2f} us per event "
            f"({found['copies_skipped']:,} copies skipped of {found['events']:,} events)"
        )
    memory, disk = results["memory"], results["disk"]
    held = f"{disk['held_ids'] / 1e6:.1f} M ids held"
    figure("dedup_horizon", f"horizon RSS per id, {held}", disk["held_b_per_id"], "B", memory["held_b_per_id"])
    figure("dedup_horizon", f"horizon peak RSS per id, {held}", disk["peak_b_per_id"], "B", memory["peak_b_per_id"])
    figure(
        "dedup_horizon", "horizon admit cost per event, 1 % copies", disk["us_per_event"], "us", memory["us_per_event"]
    )


if __name__ == "__main__":
    main()
