"""Gateway overhead: latency and CPU added over calling the stub upstream directly, and req/s on both cores.

The stub upstream, the gateways (``spendstream gateway``, one worker and ``--workers N``) and this load generator
run as separate processes, with a real embedded broker receiving the usage events. The gateways run as in
production: metering on, a routing policy (``SPENDSTREAM_POLICY`` with a ``routing:`` section) and a realistic
decision set on the enforcement topic (10,000 decisions, and an alert on the benchmark's team, a throttle on every
user: each request matches some). Targets (docs/architecture.md §11): added p50 <= 0.35 ms and gateway CPU
<= 0.35 ms per request at concurrency 1; at concurrency 32, N workers >= 2x the requests/s of the gateway before
it ran several workers (``--baseline-rev eb11ad7``: that revision's one-worker gateway, measured in the same run).
Targets take turns in ``--rounds`` alternating blocks, so a shared machine's drift reaches all of them alike;
the CPU time per request (utime + stime of every gateway process, all threads) varies far less than latency.
Streaming: added time to first byte and to last byte, separately.
The load generator (``http_load.py``) and the stub upstream (``lean_upstream.py``, where a real provider would cost
this machine nothing) are lean so that the cores go to what is measured; the table shows their CPU per request,
and from them this machine's ceiling in requests/s at concurrency 32.
Every figure is also printed as one ``FIGURE {json}`` line (``bench/readme_table.py`` reads them).
Run: .venv/bin/python bench/bench_gateway.py [--requests 4000] [--rounds 10] [--workers N]
[--baseline-rev REV | --baseline-services DIR]
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

from figures import checkout_services
from http_load import post_many
from spendstream.gateway.keys import hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

KEY = "sk-ss-bench"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say four words please"}], "max_tokens": 4}
).encode()


async def load(
    url: str,
    requests: int,
    concurrency: int,
    body: bytes | Callable[[], bytes] = BODY,
    first_bytes: list[float] | None = None,
) -> tuple[list[float], float]:
    """Latencies (ms) of ``requests`` POSTs with ``concurrency`` in flight, and the elapsed seconds (through the
    lean load generator of ``http_load.py``, so the machine's CPU goes to what is measured).

    ``body`` is the request body, or a function that makes a new one per request (e.g. cache misses).
    ``first_bytes`` collects the time (ms) to the first byte of each response body (streams).
    """
    make_body = body if callable(body) else lambda: body
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return await post_many(url, requests, concurrency, make_body, headers, first_bytes)


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
    client_cpu_seconds: float = 0.0  # of this process (the load generator) meanwhile
    upstream_cpu_seconds: float = 0.0  # of the stub upstream meanwhile
    first_bytes: list[float] = field(default_factory=list)  # ms, streams only

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.elapsed

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / len(self.latencies)

    def ceiling(self, cores: int) -> float:
        """The requests/s ``cores`` CPUs could serve at this target's CPU cost per request of gateway, stub
        upstream and load generator together (the machine's limit, whatever the number of gateway workers)."""
        per_request = self.cpu_seconds + self.client_cpu_seconds + self.upstream_cpu_seconds
        return cores * len(self.latencies) / per_request


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time so far of a process and its live children (all threads: a gateway's workers too),
    from /proc (Linux); NaN elsewhere or for None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return math.nan
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int | None) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, TypeError):
        return []


def interleaved(
    targets: dict[str, Target],
    requests: int,
    concurrency: int,
    rounds: int,
    path: str = "/v1/chat/completions",
    streams: bool = False,
    upstream_pid: int | None = None,
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
            cpu_before, upstream_before = cpu_seconds(target.pid), cpu_seconds(upstream_pid)
            client_before = time.process_time()
            result = measured[name]
            first = result.first_bytes if streams else None
            latencies, elapsed = asyncio.run(load(target.url + path, block, concurrency, target.body, first))
            result.client_cpu_seconds += time.process_time() - client_before
            result.upstream_cpu_seconds += cpu_seconds(upstream_pid) - upstream_before
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


POLICY = """
name: bench
timezone: UTC
org: acme
budgets:
  - {scope: "team:bench", period: month, amount_usd: 1000000}
routing:
  default_environment: production
  environments:
    production:
      tiers:
        simple: [openai/gpt-4o-mini]
        medium: [openai/gpt-4o-mini]
        complex: [openai/gpt-4o]
  providers:
    openai: {priority: 1}
"""


def publish_decision_set(bootstrap: str, count: int) -> None:
    """``count`` decisions over teams, users, features and projects (``bench_enforcer``'s mix, with a throttle on
    every user), and an alert on the benchmark's own team: every request matches two rules."""
    from confluent_kafka import Producer

    from bench_enforcer import decisions
    from spendstream.core.codec import AvroCodec
    from spendstream.core.events import Decision
    from spendstream.core.topics import ENFORCEMENT

    codec = AvroCodec("decision")
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    mine = Decision(scope="team:bench", action="alert", version=1, reason="80 % of the monthly budget")
    for decision in [*decisions(count), mine]:
        producer.produce(ENFORCEMENT, key=decision.scope.encode(), value=codec.encode(decision.to_avro()))
        producer.poll(0)
    if producer.flush(30):
        raise SystemExit("the decision set was not delivered")


def start_gateway(python: str, config: Path, port: int, workers: int, env: dict[str, str]) -> subprocess.Popen:
    argv = [python, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(port)]
    if workers != 1:  # (a baseline version may not know --workers)
        argv += ["--workers", str(workers)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)


def wait_workers(url: str, workers: int, timeout: float = 60.0) -> None:
    """Until ``workers`` distinct processes have answered /healthz with their Enforcer ready."""

    async def ready_pids() -> set[int]:
        pids = set()
        for _ in range(10 * workers):
            async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as response:
                body = await response.json()
                if body.get("enforcer_ready"):
                    pids.add(body["pid"])
        return pids

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(asyncio.run(ready_pids())) >= workers:
                return
        except (aiohttp.ClientError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}: {workers} ready workers did not answer")


def main() -> None:
    from figures import figure, machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per target and concurrency")
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks the requests are split into")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="workers of the multi-process run")
    parser.add_argument("--decisions", type=int, default=10_000, help="decisions on the enforcement topic")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument(
        "--baseline-services",
        type=Path,
        help="a services/ directory of another spendstream version (e.g. `git archive REV services | tar -x -C DIR`): "
        "its one-worker gateway is measured too, as 'before', in the same alternating blocks",
    )
    baseline.add_argument(
        "--baseline-rev", help="a git revision of this repository, measured as --baseline-services measures its files"
    )
    args = parser.parse_args()
    python = sys.executable
    many = f"{args.workers} workers"
    machine("gateway")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        if args.baseline_rev:
            args.baseline_services = checkout_services(args.baseline_rev, Path(tmp) / "baseline")
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        publish_decision_set(broker.bootstrap, args.decisions)
        stub_port, one_port, many_port = free_port(), free_port(), free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        one_url, many_url = f"http://127.0.0.1:{one_port}", f"http://127.0.0.1:{many_port}"
        config, policy = Path(tmp) / "gateway.json", Path(tmp) / "policy.yaml"
        key = {"sha256": hash_key(KEY), "org": "acme", "team": "bench", "feature": "load", "user": "u-bench"}
        config.write_text(
            json.dumps(
                {
                    "keys": [{**key, "name": "bench"}],
                    "providers": {
                        "openai": {"upstreams": [{"base_url": stub_url}]},
                        "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": stub_url}]},
                    },
                }
            )
        )
        policy.write_text(POLICY)
        env = {
            **os.environ,
            "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SPENDSTREAM_DATA_DIR": tmp,
            "SPENDSTREAM_POLICY": str(policy),
        }
        stub = subprocess.Popen([python, str(Path(__file__).with_name("lean_upstream.py")), "--port", str(stub_port)])
        one = start_gateway(python, config, one_port, 1, env)
        several = start_gateway(python, config, many_port, args.workers, env)
        before: subprocess.Popen | None = None
        before_url = ""
        if args.baseline_services is not None:
            before_port = free_port()
            before_url = f"http://127.0.0.1:{before_port}"
            before_env = {**env, "PYTHONPATH": str(args.baseline_services.resolve())}
            before = start_gateway(python, config, before_port, 1, before_env)
        try:
            wait_http(stub_url + "/v1/models")
            wait_workers(one_url, 1)
            wait_workers(many_url, args.workers)
            if before is not None:
                wait_http(before_url + "/healthz")
            print(
                f"{args.requests:,} chat.completions requests per target and concurrency, in {args.rounds} alternating "
                f"blocks; {args.decisions:,} decisions in force, routing policy on, metering on; latency in ms"
            )
            print(
                f"  {'target':10} {'conc':>4} {'p50':>7} {'p99':>7} {'req/s':>8} {'cpu ms/req':>10} "
                f"{'stub cpu':>8} {'load cpu':>8}"
            )
            runs = {
                1: {"direct": Target(stub_url), "1 worker": Target(one_url, pid=one.pid)},
                32: {
                    "direct": Target(stub_url),
                    "1 worker": Target(one_url, pid=one.pid),
                    many: Target(many_url, pid=several.pid),
                },
            }
            if before is not None:
                for targets in runs.values():
                    targets["before"] = Target(before_url, pid=before.pid)
            results: dict[tuple[str, int], Measured] = {}
            for concurrency, targets in runs.items():
                measured = interleaved(targets, args.requests, concurrency, args.rounds, upstream_pid=stub.pid)
                for name, m in measured.items():
                    results[(name, concurrency)] = m
                    p50, p99 = pct(m.latencies, 0.5), pct(m.latencies, 0.99)
                    rps, cpu = m.requests_per_s, m.cpu_ms_per_request
                    stub_cpu = m.upstream_cpu_seconds * 1000 / len(m.latencies)
                    load_cpu = m.client_cpu_seconds * 1000 / len(m.latencies)
                    print(
                        f"  {name:10} {concurrency:4} {p50:7.3f} {p99:7.3f} {rps:8.0f} {cpu:10.3f} "
                        f"{stub_cpu:8.3f} {load_cpu:8.3f}"
                    )
            direct, gateway = results[("direct", 1)], results[("1 worker", 1)]
            added50 = pct(gateway.latencies, 0.5) - pct(direct.latencies, 0.5)
            added99 = pct(gateway.latencies, 0.99) - pct(direct.latencies, 0.99)
            print(f"added by the gateway at concurrency 1: p50 {added50:.3f} ms, p99 {added99:.3f} ms")
            print(f"gateway CPU per request at concurrency 1: {gateway.cpu_ms_per_request:.3f} ms")
            baseline50 = baseline_cpu = None
            if before is not None:
                was = results[("before", 1)]
                baseline50 = pct(was.latencies, 0.5) - pct(direct.latencies, 0.5)
                baseline_cpu = was.cpu_ms_per_request
                print(f"before: added p50 {baseline50:.3f} ms, CPU {baseline_cpu:.3f} ms per request")
            version = f"revision {args.baseline_rev}" if args.baseline_rev else "the --baseline-services version"
            figure(
                "gateway",
                "added p50, concurrency 1",
                added50,
                "ms",
                baseline=baseline50,
                baseline_of=version,
                target="<= 0.35",
            )
            # A difference of two p99s is noise-dominated (it can come out negative): show both tails instead.
            p99_gateway, p99_direct = pct(gateway.latencies, 0.99), pct(direct.latencies, 0.99)
            name = "p99 through the gateway, concurrency 1"
            figure("gateway", name, p99_gateway, "ms", baseline=p99_direct, baseline_of="stub directly")
            cpu1 = gateway.cpu_ms_per_request
            name = "gateway CPU per request, concurrency 1"
            figure("gateway", name, cpu1, "ms", baseline=baseline_cpu, baseline_of=version, target="<= 0.35")
            base32 = results[("direct", 32)].requests_per_s
            one32, many32 = results[("1 worker", 32)].requests_per_s, results[(many, 32)].requests_per_s
            print(f"req/s at concurrency 32: {many} {many32:,.0f}, 1 worker {one32:,.0f} ({many32 / one32:.2f}x), "
                  f"stub directly {base32:,.0f}")  # fmt: skip
            # The gateway shares the cores with the stub upstream and the load generator: at their CPU cost per
            # request, no number of workers can serve more than this on this machine.
            cores = os.cpu_count() or 1
            ceiling = results[(many, 32)].ceiling(cores)
            print(
                f"this machine's ceiling at the {many}' CPU cost per request (gateway + stub + load generator on "
                f"{cores} cores): {ceiling:,.0f} req/s; {many} reach {many32 / ceiling:.0%} of it"
            )
            figure("gateway", f"req/s ceiling of this machine, concurrency 32, {many}", ceiling, "req/s")
            figure(
                "gateway",
                "req/s, concurrency 32, 1 worker",
                one32,
                "req/s",
                baseline=base32,
                baseline_of="stub directly",
            )
            name = f"req/s, concurrency 32, {many}"
            figure("gateway", name, many32, "req/s", baseline=one32, baseline_of="1 worker")
            if before is not None:
                before32 = results[("before", 32)].requests_per_s
                print(f"{many} against {version}'s 1 worker at concurrency 32: {many32 / before32:.2f}x")
                name = f"req/s, concurrency 32, {many}, against {version}'s 1 worker"
                figure("gateway", name, many32, "req/s", baseline=before32, baseline_of=version, target=">= 2x")

            stream = json.dumps({**json.loads(BODY), "stream": True}).encode()
            streamed = interleaved(
                {"direct": Target(stub_url, stream), "1 worker": Target(one_url, stream, one.pid)},
                max(500, args.requests // 4),
                1,
                args.rounds,
                streams=True,
                upstream_pid=stub.pid,
            )
            d, g = streamed["direct"], streamed["1 worker"]
            first = pct(g.first_bytes, 0.5) - pct(d.first_bytes, 0.5)
            last = pct(g.latencies, 0.5) - pct(d.latencies, 0.5)
            print(f"streamed, concurrency 1, added p50: first byte {first:.3f} ms, last byte {last:.3f} ms")
            figure("gateway", "streamed, added p50 to first byte, concurrency 1", first, "ms")
            figure("gateway", "streamed, added p50 to last byte, concurrency 1", last, "ms")

            async def health() -> dict:
                async with aiohttp.ClientSession() as session, session.get(one_url + "/healthz") as response:
                    return await response.json()

            time.sleep(1.0)
            body = asyncio.run(health())
            emitter, requests = body["emitter"], body["requests"]
            print(f"1 worker: {requests}; usage events emitted {emitter['emitted']:,}, acked {emitter['sent']:,}")
        finally:
            for proc in (before, several, one, stub):
                if proc is None:
                    continue
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
