"""Gateway overhead: latency added over calling the stub upstream directly, and req/s through one process.

The stub upstream, the gateway (``spendstream gateway``) and this load generator run as separate processes,
with a real embedded broker receiving the usage events. Targets: p50 added latency < 0.5 ms at concurrency 1,
>= 2,000 req/s through one gateway process.
Direct and gateway calls alternate in blocks, so both see the same machine conditions; the gateway process's CPU
time per request (all threads) is printed too.
Run: .venv/bin/python bench/bench_gateway.py [--requests 4000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from spendstream.gateway.keys import hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

KEY = "sk-ss-bench"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say four words please"}], "max_tokens": 4}
).encode()


async def load(
    url: str, requests: int, concurrency: int, body: bytes | Callable[[], bytes] = BODY
) -> tuple[list[float], float]:
    """Latencies (ms) of ``requests`` POSTs with ``concurrency`` in flight, and the elapsed seconds.

    ``body`` is the request body, or a function that makes a new one per request (e.g. cache misses).
    """
    make_body = body if callable(body) else lambda: body
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                data = make_body()
                start = time.perf_counter()
                async with session.post(url, data=data, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed


@dataclass
class Target:
    """Where one measured target sends its requests, what it sends, and whose CPU time to count (None: none)."""

    url: str
    body: bytes | Callable[[], bytes] = BODY
    pid: int | None = None


@dataclass
class Measured:
    latencies: list[float] = field(default_factory=list)  # ms
    elapsed: float = 0.0  # seconds under load
    cpu_seconds: float = 0.0  # of the target's process while it was measured (NaN: not counted)

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.elapsed

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / len(self.latencies)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (all threads), from /proc (Linux); NaN elsewhere or for None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(
    targets: dict[str, Target], requests: int, concurrency: int, rounds: int, path: str = "/v1/chat/completions"
) -> dict[str, Measured]:
    """Latencies, elapsed seconds and CPU time per target, measured in ``rounds`` alternating blocks after a warm-up.

    Alternating keeps a shared machine's drift (other processes, CPU frequency) out of the difference between
    targets: each one sees the same conditions, block by block.
    """
    block = max(1, requests // rounds)
    measured = {name: Measured() for name in targets}
    for target in targets.values():
        asyncio.run(load(target.url + path, 300, concurrency, target.body))
    for _ in range(rounds):
        for name, target in targets.items():
            cpu_before = cpu_seconds(target.pid)
            latencies, elapsed = asyncio.run(load(target.url + path, block, concurrency, target.body))
            result = measured[name]
            result.cpu_seconds += cpu_seconds(target.pid) - cpu_before
            result.latencies.extend(latencies)
            result.elapsed += elapsed
    return measured


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def wait_http(url: str, timeout: float = 30.0) -> None:
    async def probe() -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                body = await response.json()
                return response.status == 200 and body.get("enforcer_ready", True)
        except (aiohttp.ClientError, OSError, ValueError):
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(probe()):
            return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per target and concurrency")
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks the requests are split into")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        stub_port, gateway_port = free_port(), free_port()
        stub_url, gateway_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{gateway_port}"
        config = Path(tmp) / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "keys": [{"sha256": hash_key(KEY), "team": "bench", "feature": "load", "name": "bench"}],
                    "providers": {
                        "openai": {"upstreams": [{"base_url": stub_url}]},
                        "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": stub_url}]},
                    },
                }
            )
        )
        env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap, "SPENDSTREAM_DATA_DIR": tmp}
        stub = subprocess.Popen([python, "-m", "spendstream.gateway.stub_upstream", "--port", str(stub_port)])
        gateway = subprocess.Popen(
            [python, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(gateway_port)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_http(stub_url + "/v1/models")
            wait_http(gateway_url + "/healthz")
            print(f"{args.requests:,} chat.completions requests per target, in {args.rounds} alternating blocks; ms")
            print(f"  {'target':8} {'conc':>4} {'p50':>7} {'p99':>7} {'req/s':>8} {'cpu ms/req':>10}")
            results = {}
            targets = {"direct": Target(stub_url), "gateway": Target(gateway_url, pid=gateway.pid)}
            for concurrency in (1, 32):
                measured = interleaved(targets, args.requests, concurrency, args.rounds)
                for name, m in measured.items():
                    results[(name, concurrency)] = (pct(m.latencies, 0.5), pct(m.latencies, 0.99), m.requests_per_s)
                    p50, p99, rps = results[(name, concurrency)]
                    print(f"  {name:8} {concurrency:4} {p50:7.3f} {p99:7.3f} {rps:8.0f} {m.cpu_ms_per_request:10.3f}")
            for concurrency in (1, 32):
                added50 = results[("gateway", concurrency)][0] - results[("direct", concurrency)][0]
                added99 = results[("gateway", concurrency)][1] - results[("direct", concurrency)][1]
                print(f"added by the gateway at concurrency {concurrency}: p50 {added50:.3f} ms, p99 {added99:.3f} ms")
            stream = json.dumps({**json.loads(BODY), "stream": True}).encode()
            latencies, _ = asyncio.run(load(gateway_url + "/v1/chat/completions", 500, 1, stream))
            print(f"streamed through the gateway, concurrency 1: p50 {pct(latencies, 0.5):.3f} ms")

            async def health() -> dict:
                async with aiohttp.ClientSession() as session, session.get(gateway_url + "/healthz") as response:
                    return await response.json()

            time.sleep(1.0)
            emitter = asyncio.run(health())["emitter"]
            print(
                f"usage events emitted by the gateway: {emitter['emitted']:,}, acked by the broker: {emitter['sent']:,}"
            )
        finally:
            for proc in (gateway, stub):
                proc.terminate()
                proc.wait(15)


if __name__ == "__main__":
    main()
