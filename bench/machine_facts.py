"""What every benchmark prints first: the CPU it ran on and how quick it is right now (figures are only comparable
on the same machine at the same speed)."""

from __future__ import annotations

import math
import platform
import time


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reference_ms(runs: int = 5) -> float:
    """Milliseconds a fixed pure-Python workload takes here now (the best of ``runs``): a shared virtual machine's
    speed moves by 2-3x within minutes, which no load average shows, so a figure is read beside the speed it ran at."""
    best = math.inf
    for _ in range(runs):
        started = time.perf_counter()
        kept: dict[int, str] = {}
        for i in range(200_000):
            kept[i & 1023] = str(i)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)
