"""Enforcer.check() latency with 10,000 active decisions loaded from a real broker.

Prints catch-up time and, for typical request shapes, p50/p99 of check() (target: p99 < 5 us) and the CPU
time per call of the calling thread. The shapes are measured in turn, ``--rounds`` times, so load from
other work on the machine spreads over all of them; the table shows the median and the range over rounds.
The "no decision matches" shape is the floor every other shape is compared with.
A request seen again is answered from what the Enforcer kept of its first answers; the last two shapes send every
call from a user not seen lately (more users than answers kept): users seen once before in an untimed pass, and users
never seen (new names each round, so each call also adds the user to the ``user:*`` throttle's table; its CPU column
is measured on other new users). Such users, with no rule of their own, share a kept answer.
Each timed call is two ``perf_counter_ns`` reads apart (about 0.1 us of the figure) and passes its fields as a dict
(``check(**request)``, as the gateway does). The garbage collector stays on, as in a gateway; the table counts the
collections that ran during the timed calls.
Run: .venv/bin/python bench/bench_enforcer.py [--decisions 10000] [--calls 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer

from figures import figure, machine
from spendstream.core.codec import AvroCodec
from spendstream.core.config import load_settings
from spendstream.core.events import Decision
from spendstream.core.policy import parse_policy
from spendstream.core.topics import ENFORCEMENT
from spendstream.edge.enforcer import Enforcer
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

ACTIONS = ("alert", "fallback", "throttle", "shutoff", "allow")


def decisions(n: int) -> list[Decision]:
    """A mix over teams, users, features and projects, plus a per-user throttle on every user.

    In the mix every team decision is an alert; ``team:vf`` adds a team fallback (gpt-4o -> gpt-4o-mini).
    """
    out = [
        Decision(scope="user:*", action="throttle", throttle_rps=1e9, version=1),
        Decision(scope="team:vf", action="fallback", fallback_models={"gpt-4o": "gpt-4o-mini"}, version=1),
    ]
    dims = ("team", "user", "user", "feature", "project")
    for i in range(n - 2):
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


def measure(
    enforcer: Enforcer, requests: list[dict[str, str]], untimed: list[dict[str, str]] | None = None
) -> tuple[float, float, float, int]:
    """p50 and p99 of timed calls, CPU microseconds per call of an untimed loop (this thread only) over ``untimed``
    (default: the same requests again), and the garbage collections that ran during the timed calls."""
    check = enforcer.check
    samples = []
    clock = time.perf_counter_ns
    collections = [0]

    def count_collection(phase: str, info: dict[str, int]) -> None:
        collections[0] += phase == "start"

    gc.callbacks.append(count_collection)
    try:
        for request in requests:
            start = clock()
            check(**request)
            samples.append(clock() - start)
    finally:
        gc.callbacks.remove(count_collection)
    samples.sort()
    untimed = requests if untimed is None else untimed
    cpu_start = time.thread_time()
    for request in untimed:
        check(**request)
    cpu_us = (time.thread_time() - cpu_start) / len(untimed) * 1e6
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000, cpu_us, collections[0]


def report(results: dict[str, list[tuple[float, float, float, int]]]) -> None:
    print(f"  {'request shape':52} {'p50':>6} {'p99':>6} {'p99 range':>13} {'CPU/call':>9} {'gc':>4}")
    for name, rounds in results.items():
        p50 = statistics.median(r[0] for r in rounds)
        p99s = [r[1] for r in rounds]
        cpu = statistics.median(r[2] for r in rounds)
        collections = sum(r[3] for r in rounds)
        spread = f"{min(p99s):.2f}-{max(p99s):.2f}"
        print(f"  {name:52} {p50:6.2f} {statistics.median(p99s):6.2f} {spread:>13} {cpu:9.2f} {collections:4}")
        figure("enforcer", f"check() p99, {name}", statistics.median(p99s), "us", target="< 5", cpu_us=round(cpu, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    machine("enforcer")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=1)
        codec = AvroCodec("decision")
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
        for decision in decisions(args.decisions):
            producer.produce(ENFORCEMENT, key=decision.scope.encode(), value=codec.encode(decision.to_avro()))
        producer.flush(60)
        started = time.perf_counter()
        # its own data directory: a verify key in the shell's (`spendstream dev`'s) would refuse these decisions
        settings = load_settings(kafka_bootstrap=broker.bootstrap, data_dir=Path(tmp))
        with Enforcer(settings=settings) as enforcer:
            if not enforcer.wait_ready(120):
                raise SystemExit("enforcer did not catch up")
            loaded = time.perf_counter() - started
            print(f"decisions active: {len(enforcer.decisions())}, catch-up from the broker: {loaded:.2f} s")
            shapes = {
                "no decision matches": {"team": "nobody", "feature": "none", "model": "gpt-4o"},
                "team alert": {"team": "v0", "model": "gpt-4o"},
                "team fallback + user:* throttle": {"team": "vf", "user": "someone", "model": "gpt-4o"},
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
            # The policy's own rules on top of the same decisions: an allowed-model list and a user:* request quota
            # (counted at the edge; a cap no run reaches, so every call is counted and allowed).
            rules = parse_policy(
                "allowed_models:\n  'environment:development': [gpt-4o-mini, 'local/*']\n"
                "quotas:\n  - {scope: 'user:*', requests_per_day: 1000000000000}\n"
            )
            with Enforcer(settings=settings, policy=rules, policy_topic=None) as with_rules:
                if not with_rules.wait_ready(120):
                    raise SystemExit("enforcer did not catch up")
                runs = {name: (enforcer, [request] * args.calls) for name, request in shapes.items()}
                runs["policy list + user:* quota + team fallback"] = (
                    with_rules,
                    [{"team": "vf", "user": "someone", "environment": "development", "model": "gpt-4o"}] * args.calls,
                )
                not_seen_lately = [{"team": "vf", "user": f"user{i}", "model": "gpt-4o"} for i in range(args.calls)]
                for request in not_seen_lately:  # seen once before, untimed
                    enforcer.check(**request)
                runs["team fallback + user:* throttle, a user not seen lately"] = (enforcer, not_seen_lately)
                never_seen = "team fallback + user:* throttle, a user never seen"
                runs[never_seen] = (enforcer, not_seen_lately[:1])  # (for the action printed below)
                results: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in runs}
                for round_ in range(args.rounds):
                    for name, (target, requests) in runs.items():
                        if name == never_seen:
                            new = [
                                {"team": "vf", "user": f"new{round_}-{i}", "model": "gpt-4o"}
                                for i in range(2 * args.calls)
                            ]
                            results[name].append(measure(target, new[: args.calls], new[args.calls :]))
                        else:
                            results[name].append(measure(target, requests))
            for name, (target, requests) in runs.items():
                print(f"  {name}: {target.check(**requests[0]).action}")
            print(f"check() over {args.calls:,} calls per shape and round, {args.rounds} rounds (us):")
            report(results)
            print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
