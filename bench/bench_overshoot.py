"""Budget overshoot: how much spend lands past a hard limit while 8 clients drive the gateway flat out.

Real embedded broker, real processor process (`spendstream processor`), real gateway processes
(`spendstream gateway`) in front of the stub upstream, real decisions. For each of ``--limits-usd`` a team has a
hard monthly limit; 8 clients send chat completions as fast as they can until each has been refused. A request
costs about 1/``--requests-per-budget`` of the budget (its ``max_tokens`` is chosen so), so a budget lasts the
same number of requests whatever its size. The figures come from the usage events themselves (exact nanos): the
spend of every ``ok`` event past the limit, as a percentage of the limit (overshoot), and the budget left unspent
when the clients were refused (under-use).
With ``--baseline-services`` (another version's services/ directory), its gateway drives a twin team of each
budget, turn about with this version's, through the same processor: before and after in the same run.
Target (docs/architecture.md §7.4): overshoot <= 1 % of the budget with the default settings.
Run: .venv/bin/python bench/bench_overshoot.py [--limits-usd 1,4,100] [--clients 8] [--baseline-services DIR]
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
from decimal import Decimal
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
from figures import figure, machine

PARTITIONS = 6
# Models by output price (nano-USD per token): a request's cost is set by its model and max_tokens; the stub
# answers max_tokens, at most 256.
MODELS = (("gpt-4o-mini", 600), ("gpt-4o", 10_000), ("o1", 60_000))
STUB_MAX_TOKENS = 256


def key_of(team: str) -> str:
    return f"sk-ss-overshoot-{team}"


def body_for(limit_nanos: int, requests_per_budget: int) -> bytes:
    """A chat completion that costs about ``limit / requests_per_budget``: the cheapest model that gets there
    within the stub's 256 output tokens."""
    wanted = limit_nanos // requests_per_budget
    model, per_token = next(((m, p) for m, p in MODELS if wanted // p <= STUB_MAX_TOKENS), MODELS[-1])
    tokens = max(1, min(STUB_MAX_TOKENS, wanted // per_token))
    messages = [{"role": "user", "content": "write a short poem"}]
    return json.dumps({"model": model, "messages": messages, "max_tokens": tokens}).encode()


async def drive(url: str, key: str, body: bytes, clients: int, deadline_s: float) -> tuple[int, int, float]:
    """Requests until every client was refused (402) once; returns (ok, refused, elapsed). A 429 (requests in
    flight hold what remains of the budget) is retried at once, as a client that wants the rest of the budget
    would (SDKs wait its one-second Retry-After)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    ok = refused = 0
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            nonlocal ok, refused
            while time.monotonic() - started < deadline_s:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                if response.status == 200:
                    ok += 1
                elif response.status == 402:
                    refused += 1
                    return
                elif response.status == 429:
                    continue
                else:
                    raise RuntimeError(f"gateway answered {response.status}")

        await asyncio.gather(*(client() for _ in range(clients)))
    return ok, refused, time.monotonic() - started


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


def spend_of(events: list[dict], team: str) -> tuple[int, int, int]:
    """(spend of the team's served requests, served, refused)."""
    mine = [e for e in events if e["team"] == team]
    served = [e for e in mine if e["status"] == "ok"]
    return sum(e["cost_nanos"] or 0 for e in served), len(served), sum(e["status"] == "blocked" for e in mine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits-usd", default="1,4,100", help="hard monthly limits, one team each (comma-separated)")
    parser.add_argument("--requests-per-budget", type=int, default=20_000, help="about how many requests a budget pays")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (--workers)")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="give up on one budget after this long")
    parser.add_argument("--baseline-services", type=Path, help="another version's services/ directory: 'before'")
    args = parser.parse_args()
    limits = [Decimal(x) for x in args.limits_usd.split(",")]
    versions = {"after": None} if args.baseline_services is None else {"before": args.baseline_services, "after": None}
    teams = {(limit, version): f"capped-{limit}-{version}" for limit in limits for version in versions}
    python = sys.executable
    machine("overshoot")
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedBroker(log_path=Path(tmp_name) / "broker.log") as broker:
        tmp = Path(tmp_name)
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=PARTITIONS)
        policy = tmp / "policy.yaml"
        budgets = "".join(
            f'  - {{scope: "team:{team}", period: month, amount_usd: {limit}}}\n' for (limit, _), team in teams.items()
        )
        policy.write_text(f"name: default\ntimezone: UTC\norg: acme\nbudgets:\n{budgets}")
        stub_port = free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        config = tmp / "gateway.json"
        keys = [{"sha256": hash_key(key_of(team)), "org": "acme", "team": team} for team in teams.values()]
        config.write_text(
            json.dumps(
                {
                    "keys": keys,
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
        ]
        urls = {}
        for version, services in versions.items():
            port = free_port()
            urls[version] = f"http://127.0.0.1:{port}"
            version_env = env if services is None else {**env, "PYTHONPATH": str(services.resolve())}
            argv = ["gateway", "--config", str(config), "--port", str(port)]
            if args.workers != 1:  # (a baseline version may not know --workers)
                argv += ["--workers", str(args.workers)]
            procs.append(
                subprocess.Popen([python, "-m", "spendstream.cli", *argv], env=version_env, stdout=log, stderr=log)
            )
        try:
            wait_http(stub_url + "/v1/models")
            for url in urls.values():
                wait_http(url + "/healthz")
            time.sleep(8)  # the processor joins its consumer groups
            print(f"{args.clients} clients per budget, {args.workers} gateway worker(s); a budget pays about "
                  f"{args.requests_per_budget:,} requests")  # fmt: skip
            for limit in limits:
                limit_nanos = int(limit * NANOS_PER_USD)
                body = body_for(limit_nanos, args.requests_per_budget)
                for version, url in urls.items():
                    team = teams[(limit, version)]
                    ok, _, elapsed = asyncio.run(
                        drive(url + "/v1/chat/completions", key_of(team), body, args.clients, args.max_seconds)
                    )
                    print(f"  ${limit} {version}: {elapsed:.1f} s, {ok / elapsed:,.0f} served requests/s")
            time.sleep(2)  # the gateways' emitters flush the last events
            events = usage_events(broker.bootstrap)
            columns = ("budget", "version", "served", "refused", "spend nanos", "overshoot", "unspent")
            print("  {:>8} {:7} {:>8} {:>7} {:>16} {:>9} {:>8}".format(*columns))
            for limit in limits:
                limit_nanos = int(limit * NANOS_PER_USD)
                for version in urls:
                    spend, served, refused = spend_of(events, teams[(limit, version)])
                    over = 100 * max(0, spend - limit_nanos) / limit_nanos
                    unspent = 100 * max(0, limit_nanos - spend) / limit_nanos
                    print(f"  {'$' + str(limit):>8} {version:7} {served:8,} {refused:7,} {spend:16,} "
                          f"{over:8.3f}% {unspent:7.3f}%")  # fmt: skip
                    if version == "after":
                        baseline = None
                        if "before" in urls:
                            before_spend = spend_of(events, teams[(limit, "before")])[0]
                            baseline = 100 * max(0, before_spend - limit_nanos) / limit_nanos
                        name = f"overshoot of a ${limit} hard budget, {args.clients} clients"
                        version = "the --baseline-services version"
                        extra = {"baseline_of": version, "target": "<= 1", "unspent": round(unspent, 3)}
                        figure("overshoot", name, over, "%", baseline=baseline, **extra)
        except BaseException:
            print((tmp / "services.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
