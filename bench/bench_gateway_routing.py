"""Gateway overhead with cost-aware routing and the response cache, side by side with the plain gateway.

Separate processes: the stub upstream, a plain gateway (no policy), a routing gateway (``SPENDSTREAM_POLICY`` with a
``routing:`` section, the response cache opted in for the benchmark's team, the usage follower reading the topic),
and this load generator; a real embedded broker receives the usage events. Per concurrency (1 and 32):

* ``direct``     the stub upstream without a gateway (the baseline), every prompt different
* ``gateway``    the plain gateway, every prompt different
* ``routed``     the routing gateway, every prompt different: classify, route (gpt-4o -> gpt-4o-mini), cache miss
* ``cached``     the routing gateway, one prompt repeated: classify, route, answered from the cache

The targets take turns in ``--rounds`` alternating blocks, so a shared machine's drift (it varies by a third
from one minute to the next) reaches all of them alike. Besides latency it prints the gateway process's CPU time
per request (utime + stime from /proc, all its threads), which varies far less than latency between runs.

Targets of the edge (docs/architecture.md §11): p50 added latency < 0.5 ms at concurrency 1,
>= 2,000 req/s per gateway process.
Run: .venv/bin/python bench/bench_gateway_routing.py [--requests 4000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from spendstream.gateway.keys import hash_key
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import KEY, Target, interleaved, pct, wait_http

POLICY = """
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
PROMPT = "What is the capital of France?"


def body(prompt: str) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}).encode()


REPEATED = body(PROMPT)
_serial = itertools.count()


def fresh() -> bytes:
    """A prompt never sent before (a cache miss)."""
    return body(f"{PROMPT} #{next(_serial)}")


async def probe(url: str, data: bytes) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as response:
        await response.read()
        return dict(response.headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per target and concurrency")
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks the requests are split into")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        stub_port, plain_port, routed_port = free_port(), free_port(), free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        plain_url, routed_url = f"http://127.0.0.1:{plain_port}", f"http://127.0.0.1:{routed_port}"
        gateway_config = {
            "keys": [{"sha256": hash_key(KEY), "team": "bench", "feature": "load", "name": "bench"}],
            "providers": {
                "openai": {"upstreams": [{"base_url": stub_url}]},
                "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": stub_url}]},
            },
        }
        plain_config, routed_config, policy = Path(tmp) / "plain.json", Path(tmp) / "routed.json", Path(tmp) / "p.yaml"
        plain_config.write_text(json.dumps(gateway_config))
        routed_config.write_text(json.dumps({**gateway_config, "cache": {"scopes": ["team:bench"]}}))
        policy.write_text(POLICY)
        env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap, "SPENDSTREAM_DATA_DIR": tmp}
        env.pop("SPENDSTREAM_POLICY", None)
        procs = [subprocess.Popen([python, "-m", "spendstream.gateway.stub_upstream", "--port", str(stub_port)])]
        runs = ((plain_config, plain_port, {}), (routed_config, routed_port, {"SPENDSTREAM_POLICY": str(policy)}))
        for config, port, extra in runs:
            procs.append(
                subprocess.Popen(
                    [python, "-m", "spendstream.cli", "gateway", "--config", str(config), "--port", str(port)],
                    env={**env, **extra},
                    stdout=subprocess.DEVNULL,
                )
            )
        try:
            wait_http(stub_url + "/v1/models")
            wait_http(plain_url + "/healthz")
            wait_http(routed_url + "/healthz")
            path = "/v1/chat/completions"
            routed_headers = asyncio.run(probe(routed_url + path, fresh()))
            cached_headers = [asyncio.run(probe(routed_url + path, REPEATED)) for _ in range(2)][1]
            assert routed_headers.get("X-Spendstream-Model") == "gpt-4o-mini", routed_headers
            assert cached_headers.get("X-Spendstream-Cache") == "hit", cached_headers

            # Every target gets the same kind of body (fresh prompts, except the cache-hit run), so the baseline
            # parses and forwards what the measured runs do.
            targets = {
                "direct": Target(stub_url, fresh),
                "gateway": Target(plain_url, fresh, procs[1].pid),
                "routed": Target(routed_url, fresh, procs[2].pid),
                "cached": Target(routed_url, REPEATED, procs[2].pid),
            }
            print(
                f"{args.requests:,} chat.completions requests per target, in {args.rounds} alternating blocks; "
                "latency in ms"
            )
            print(f"  {'target':8} {'conc':>4} {'p50':>7} {'p99':>7} {'req/s':>8} {'cpu ms/req':>10}")
            results = {}
            for concurrency in (1, 32):
                for name, m in interleaved(targets, args.requests, concurrency, args.rounds, path).items():
                    p50, p99, rps = pct(m.latencies, 0.5), pct(m.latencies, 0.99), m.requests_per_s
                    results[(name, concurrency)] = (p50, p99, rps)
                    print(f"  {name:8} {concurrency:4} {p50:7.3f} {p99:7.3f} {rps:8.0f} {m.cpu_ms_per_request:10.3f}")
            print("added over direct (p50 / p99 ms):")
            for concurrency in (1, 32):
                base50, base99, _ = results[("direct", concurrency)]
                cells = []
                for name in ("gateway", "routed", "cached"):
                    p50, p99, _ = results[(name, concurrency)]
                    cells.append(f"{name} {p50 - base50:.3f} / {p99 - base99:.3f}")
                print(f"  concurrency {concurrency:2}: " + ", ".join(cells))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(15)


if __name__ == "__main__":
    main()
