"""Request-quota overshoot: how many calls past a ``user:*`` requests_per_day quota get through at 500 connections.

Real embedded broker, real processor process (``spendstream processor``), one or two real gateway processes
(``spendstream gateway``) in front of the stub upstream, the policy in force on every edge. ``--connections``
clients (500 by default) hit the gateways at once, spread evenly, for one user with a fresh name per round, and
each stops at its first refusal (402). The overshoot is the served calls past the quota, as a percentage of it.
Each gateway counts the requests it checks against the quota; the processor's decision, which counts every
gateway's calls, arrives later. Target: <= 10 % over the quota through one gateway.
Run: .venv/bin/python bench/bench_quota_overshoot.py [--quota 50] [--connections 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from spendstream.gateway.keys import hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import wait_http
from machine_facts import cpu_model

KEY = "sk-ss-quota-overshoot"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, {os.cpu_count()} cores, load average {load}"


async def burst(urls: list[str], connections: int, user: str, deadline_s: float) -> tuple[int, int]:
    """``connections`` clients (client i on gateway i mod len(urls)) call until refused; returns (served, refused)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "X-Spendstream-User": user}
    served = refused = 0
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        ready = asyncio.Event()

        async def client(url: str) -> None:
            nonlocal served, refused
            await ready.wait()
            while time.monotonic() - started < deadline_s:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                if response.status == 200:
                    served += 1
                elif response.status == 402:
                    refused += 1
                    return
                else:
                    raise RuntimeError(f"gateway answered {response.status}")

        tasks = [asyncio.create_task(client(urls[i % len(urls)])) for i in range(connections)]
        await asyncio.sleep(0)
        ready.set()
        await asyncio.gather(*tasks)
    return served, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=int, default=50, help="user:* requests_per_day (the reference policy's)")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="bursts per setup, each for a fresh user")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedBroker(log_path=Path(tmp_name) / "broker.log") as broker:
        tmp = Path(tmp_name)
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        policy = tmp / "policy.yaml"
        policy.write_text(
            "name: default\ntimezone: UTC\norg: acme\n"
            f'quotas:\n  - {{scope: "user:*", requests_per_day: {args.quota}}}\n'
        )
        stub_port = free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        config = tmp / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "keys": [{"sha256": hash_key(KEY), "org": "acme", "name": "q", "allow_header_attribution": True}],
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
        gateway_urls = []
        procs = [
            subprocess.Popen([python, "-m", "spendstream.gateway.stub_upstream", "--port", str(stub_port)]),
            subprocess.Popen([python, "-m", "spendstream.cli", "processor"], env=env, stdout=log, stderr=log),
        ]
        for _ in range(2):
            port = free_port()
            gateway_urls.append(f"http://127.0.0.1:{port}")
            procs.append(
                subprocess.Popen(
                    [python, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(port)],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
        try:
            wait_http(stub_url + "/v1/models")
            for url in gateway_urls:
                wait_http(url + "/healthz")
            time.sleep(8)  # the processor joins its consumer groups
            print(f"quota user:* {args.quota} requests/day, {args.connections} concurrent connections")
            print(f"  {'gateways':8} {'round':>5} {'served':>7} {'refused':>7} {'overshoot':>10}")
            for count in (1, 2):
                overshoots = []
                for round_ in range(args.rounds):
                    user = f"burst-{count}-{round_}"
                    served, refused = asyncio.run(
                        burst([u + "/v1/chat/completions" for u in gateway_urls[:count]], args.connections, user,
                              args.max_seconds)
                    )  # fmt: skip
                    over = 100 * max(0, served - args.quota) / args.quota
                    overshoots.append(over)
                    print(f"  {count:8} {round_ + 1:5} {served:7} {refused:7} {over:9.1f}%")
                print(f"  {count} gateway(s): overshoot median {statistics.median(overshoots):.1f} %, "
                      f"max {max(overshoots):.1f} % (target through one gateway: <= 10 %)")  # fmt: skip
            print(f"machine after the run: {machine()}")
        except BaseException:
            print((tmp / "services.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
