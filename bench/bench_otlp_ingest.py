"""OTLP trace ingest: spans per second through one ``spendstream api`` process (``POST /v1/traces``).

Run: ``.venv/bin/python bench/bench_otlp_ingest.py [--spans 100000] [--per-request 100] [--concurrency 8]``.
Starts its own broker and one API process, then posts protobuf ExportTraceServiceRequests (gzip, as the SDK's
exporter sends them) from this process: once with GenAI spans only (each one a usage event on the broker), once
with one GenAI span in ten (the others skipped on the attribute test). Prints spans/s by wall clock and per CPU
second of the API process (the client shares the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from machine_facts import cpu_model
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.topic_admin import create_topics

TOKEN = "bench-admin-token"


def _kv(key: str, value: str | int) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def request_body(first_span: int, count: int, genai_every: int) -> bytes:
    request = ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    resource.resource.attributes.extend([_kv("service.name", "checkout"), _kv("team", "marketing")])
    scope = resource.scope_spans.add()
    now = time.time_ns()
    for n in range(first_span, first_span + count):
        span = scope.spans.add(
            trace_id=n.to_bytes(16, "big"), span_id=(n + 1).to_bytes(8, "big"), name="chat gpt-4o-mini",
            start_time_unix_nano=now - 800_000_000, end_time_unix_nano=now,
        )  # fmt: skip
        if n % genai_every == 0:
            span.attributes.extend([
                _kv("gen_ai.operation.name", "chat"), _kv("gen_ai.provider.name", "openai"),
                _kv("gen_ai.request.model", "gpt-4o-mini"), _kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
                _kv("gen_ai.usage.input_tokens", 1200), _kv("gen_ai.usage.output_tokens", 300),
            ])  # fmt: skip
        else:
            span.attributes.extend([_kv("http.request.method", "GET"), _kv("url.path", "/checkout")])
    return gzip.compress(request.SerializeToString())


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> float:
    headers = {
        "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip", "Authorization": f"Bearer {TOKEN}"
    }  # fmt: skip
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=6)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
        env |= {
            "SPENDSTREAM_DATA_DIR": tmp, "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SPENDSTREAM_API_PORT": str(port), "SPENDSTREAM_ADMIN_TOKEN": TOKEN,
        }  # fmt: skip
        with open(Path(tmp) / "api.log", "wb") as log:
            api = subprocess.Popen([sys.executable, "-m", "spendstream.cli", "api"], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                        break
                except OSError:
                    assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
                    time.sleep(0.2)
            url = f"http://127.0.0.1:{port}/v1/traces"
            asyncio.run(post_all(url, [request_body(0, 10, 1)], 1))  # warm-up: the policy view, connections
            for label, genai_every in (("GenAI spans only", 1), ("one GenAI span in ten", 10)):
                first = 1_000_000 * genai_every
                bodies = [
                    request_body(first + i, args.per_request, genai_every)
                    for i in range(0, args.spans, args.per_request)
                ]
                cpu_before = cpu_seconds(api.pid)
                elapsed = asyncio.run(post_all(url, bodies, args.concurrency))
                cpu = cpu_seconds(api.pid) - cpu_before
                spans = len(bodies) * args.per_request
                print(
                    f"{label:<24} {spans:>8,} spans in {elapsed:6.2f} s: {spans / elapsed:>9,.0f} spans/s, "
                    f"{spans / cpu:>9,.0f} spans per API CPU second ({args.per_request} per request, "
                    f"concurrency {args.concurrency}, load {os.getloadavg()[0]:.1f})"
                )
        finally:
            api.terminate()
            api.wait(30)


if __name__ == "__main__":
    main()
