"""Budget overshoot: how much spend lands past a hard limit while 8 clients drive the gateway flat out.

Real embedded broker, real processor process (`spendstream processor`), real gateway process
(`spendstream gateway`) in front of the stub upstream, real decisions. One team has a hard monthly limit of
``--limit-usd``; 8 clients send chat completions as fast as they can until each has been refused. The figures
come from the usage events themselves (exact nanos): the spend of every ``ok`` event past the limit, as a
percentage of the limit, and the time from the event that crossed the limit to the first refused request.
Target (docs/architecture.md §7.4): overshoot <= 1 % of the budget with the default settings.
Run: .venv/bin/python bench/bench_overshoot.py [--limit-usd 4.0] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from spendstream.core.codec import AvroCodec
from spendstream.core.events import NANOS_PER_USD
from spendstream.core.topics import USAGE
from spendstream.gateway.keys import hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import wait_http

KEY = "sk-ss-overshoot"
TEAM = "capped"
PARTITIONS = 6
# ~70 output tokens of gpt-4o-mini: about 43,000 nano-USD a request.
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "write a short poem"}], "max_tokens": 70}
).encode()


async def drive(url: str, clients: int, deadline_s: float) -> tuple[int, int, float | None, float]:
    """Requests until every client was refused (402) once; returns (ok, refused, first refusal, elapsed)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    ok = refused = 0
    first_refusal: float | None = None
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            nonlocal ok, refused, first_refusal
            while time.monotonic() - started < deadline_s:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                if response.status == 200:
                    ok += 1
                elif response.status == 402:
                    refused += 1
                    first_refusal = first_refusal or time.time()
                    return
                else:
                    raise RuntimeError(f"gateway answered {response.status}")

        await asyncio.gather(*(client() for _ in range(clients)))
    return ok, refused, first_refusal, time.monotonic() - started


def usage_events(bootstrap: str) -> list[dict]:
    """Every usage event on the topic (read to the end of each partition)."""
    codec = AvroCodec("usage_event")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "overshoot-reader", "enable.partition.eof": True})
    consumer.assign([TopicPartition(USAGE, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    events, at_end = [], set()
    try:
        while len(at_end) < PARTITIONS:
            for message in consumer.consume(10_000, timeout=1.0):
                if message.error() is None:
                    events.append(codec.decode(message.value()))
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
    finally:
        consumer.close()
    return events


def report(events: list[dict], limit: int, first_refusal_wall: float | None) -> None:
    mine = sorted((e for e in events if e["team"] == TEAM), key=lambda e: e["occurred_at"])
    served = [e for e in mine if e["status"] == "ok"]
    blocked = [e for e in mine if e["status"] == "blocked"]
    spend = sum(e["cost_nanos"] or 0 for e in served)
    crossed_at: datetime | None = None
    running = 0
    for e in served:
        running += e["cost_nanos"] or 0
        if running > limit:
            crossed_at = e["occurred_at"]
            break
    over = max(0, spend - limit)
    print(f"served {len(served):,} requests, refused {len(blocked):,}")
    print(f"limit {limit:,} nanos (${limit / NANOS_PER_USD:.4f}); spend {spend:,} nanos")
    print(f"overshoot: {over:,} nanos = {100 * over / limit:.3f} % of the budget (target <= 1 %)")
    if crossed_at is not None and blocked:
        gap = (blocked[0]["occurred_at"] - crossed_at).total_seconds() * 1000
        print(f"crossing -> first refused request: {gap:.0f} ms (event time at the gateway)")
        if first_refusal_wall is not None:
            seen = (first_refusal_wall - crossed_at.timestamp()) * 1000
            print(f"crossing -> first 402 seen by a client: {seen:.0f} ms")
    elif crossed_at is None:
        print("the limit was never crossed: refused before any spend passed it")
        if blocked and served:
            print(f"budget left when the first request was refused: {limit - spend:,} nanos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit-usd", type=float, default=4.0, help="hard monthly limit of the team (about 40 s of traffic here)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="give up after this long")
    args = parser.parse_args()
    limit = round(args.limit_usd * NANOS_PER_USD)
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedBroker(log_path=Path(tmp_name) / "broker.log") as broker:
        tmp = Path(tmp_name)
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=PARTITIONS)
        policy = tmp / "policy.yaml"
        policy.write_text(
            "name: default\ntimezone: UTC\norg: acme\n"
            f'budgets:\n  - {{scope: "team:{TEAM}", period: month, amount_usd: {args.limit_usd}}}\n'
        )
        stub_port, gateway_port = free_port(), free_port()
        stub_url, gateway_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{gateway_port}"
        config = tmp / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "keys": [{"sha256": hash_key(KEY), "org": "acme", "team": TEAM, "name": "overshoot"}],
                    "providers": {
                        "openai": {"upstreams": [{"base_url": stub_url}]},
                        "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": stub_url}]},
                    },
                }
            )
        )
        env = {
            **os.environ,
            "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SPENDSTREAM_DATA_DIR": str(tmp),
            "SPENDSTREAM_POLICY": str(policy),
        }
        log = open(tmp / "services.log", "ab")  # noqa: SIM115
        procs = [
            subprocess.Popen([python, "-m", "spendstream.gateway.stub_upstream", "--port", str(stub_port)]),
            subprocess.Popen([python, "-m", "spendstream.cli", "processor"], env=env, stdout=log, stderr=log),
            subprocess.Popen(
                [python, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(gateway_port)],
                env=env,
                stdout=log,
                stderr=log,
            ),
        ]
        try:
            wait_http(stub_url + "/v1/models")
            wait_http(gateway_url + "/healthz")
            time.sleep(8)  # the processor joins its consumer groups
            print(f"{args.clients} clients, hard limit ${args.limit_usd} on team:{TEAM}")
            ok, _refused, first_refusal, elapsed = asyncio.run(
                drive(gateway_url + "/v1/chat/completions", args.clients, args.max_seconds)
            )
            print(f"run: {elapsed:.1f} s, {ok / elapsed:,.0f} served requests/s")
            time.sleep(2)  # the gateway's emitter flushes the last events
            report(usage_events(broker.bootstrap), limit, first_refusal)
        except BaseException:
            print((tmp / "services.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
