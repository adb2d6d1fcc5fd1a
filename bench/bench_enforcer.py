"""Enforcer.check() latency with 10,000 active decisions loaded from a real broker.

Prints catch-up time and p50/p99/mean of check() for typical request shapes (target: p99 < 5 us).
Run: .venv/bin/python bench/bench_enforcer.py [--decisions 10000] [--calls 200000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer

from spendstream.core.codec import AvroCodec
from spendstream.core.events import Decision
from spendstream.core.policy import parse_policy
from spendstream.core.topics import ENFORCEMENT
from spendstream.edge.enforcer import Enforcer
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

ACTIONS = ("alert", "fallback", "throttle", "shutoff", "allow")


def decisions(n: int) -> list[Decision]:
    """A mix over teams, users, features and projects, plus a per-user throttle on every user."""
    out = [Decision(scope="user:*", action="throttle", throttle_rps=1e9, version=1)]
    dims = ("team", "user", "user", "feature", "project")
    for i in range(n - 1):
        action = ACTIONS[i % len(ACTIONS)]
        out.append(
            Decision(
                scope=f"{dims[i % len(dims)]}:v{i}",
                action=action,
                version=1,
                fallback_models={"gpt-4o": "gpt-4o-mini"} if action == "fallback" else {},
                throttle_rps=1e9 if action == "throttle" else None,
            )
        )
    return out


def measure(enforcer: Enforcer, calls: int, **request: str) -> tuple[float, float, float]:
    check = enforcer.check
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        check(**request)
        samples.append(clock() - start)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000, statistics.fmean(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=1)
        codec = AvroCodec("decision")
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
        for decision in decisions(args.decisions):
            producer.produce(ENFORCEMENT, key=decision.scope.encode(), value=codec.encode(decision.to_avro()))
        producer.flush(60)
        started = time.perf_counter()
        with Enforcer(broker.bootstrap) as enforcer:
            if not enforcer.wait_ready(120):
                raise SystemExit("enforcer did not catch up")
            loaded = time.perf_counter() - started
            print(f"decisions active: {len(enforcer.decisions())}, catch-up from the broker: {loaded:.2f} s")
            shapes = {
                "no decision matches": {"team": "nobody", "feature": "none", "model": "gpt-4o"},
                "team alert": {"team": "v0", "model": "gpt-4o"},
                "team fallback + user:* throttle": {"team": "v5", "user": "someone", "model": "gpt-4o"},
                "shutoff among 4 scopes": {"team": "v15", "user": "v1", "feature": "v3", "project": "v4", "model": "m"},
                "9 dimensions: team alert, user:* throttle": {
                    "org": "o",
                    "division": "d",
                    "team": "v0",
                    "project": "p",
                    "feature": "f",
                    "user": "u",
                    "customer": "c",
                    "environment": "prod",
                    "model": "gpt-4o",
                },
            }
            print(f"check() latency over {args.calls:,} calls each (us):")
            print(f"  {'request shape':42} {'p50':>6} {'p99':>6} {'mean':>6}")
            for name, request in shapes.items():
                p50, p99, mean = measure(enforcer, args.calls, **request)
                print(f"  {name:42} {p50:6.2f} {p99:6.2f} {mean:6.2f}")
            # The policy's own rules on top of the same decisions: an allowed-model list and a user:* request quota
            # (counted at the edge; a cap no run reaches, so every call is counted and allowed).
            rules = parse_policy(
                "allowed_models:\n  'environment:development': [llama-3.2-1b, 'local/*']\n"
                "quotas:\n  - {scope: 'user:*', requests_per_day: 1000000000000}\n"
            )
            with Enforcer(broker.bootstrap, policy=rules, policy_topic=None) as with_rules:
                if not with_rules.wait_ready(120):
                    raise SystemExit("enforcer did not catch up")
                request = {"team": "v5", "user": "someone", "environment": "development", "model": "local/qwen"}
                p50, p99, mean = measure(with_rules, args.calls, **request)
                print(f"  {'policy list + user:* quota + team fallback':42} {p50:6.2f} {p99:6.2f} {mean:6.2f}")


if __name__ == "__main__":
    main()
