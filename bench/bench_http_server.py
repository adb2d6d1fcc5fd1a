"""The gateway's HTTP server against aiohttp's, alone: CPU per request answering a fixed JSON body.

Why the gateway has a server of its own (``spendstream.gateway.http_server``): its whole budget is 0.35 ms of CPU
per request (docs/architecture.md §11), and the server under it is part of that. Each server runs in its own
process and answers POSTs with a fixed JSON body; the load generator (``http_load.py``) sends the same requests
to each in alternating blocks, and the CPU time (utime + stime) of each server process is divided by the requests
it answered. aiohttp runs on asyncio's loop (as the API does), the gateway's server on asyncio's loop and on uvloop
(as the gateway runs).
Run: .venv/bin/python bench/bench_http_server.py [--requests 20000] [--rounds 10] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from http_load import post_many
from spendstream.runtime.embedded_broker import free_port

ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": {"total_tokens": 3}})
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def serve(kind: str, port: int) -> None:
    """Run one server until killed."""
    if kind == "aiohttp":
        from aiohttp import web

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=ANSWER.encode(), content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
        return
    from spendstream.gateway.app import new_event_loop
    from spendstream.gateway.http_server import HttpServer, Request, Response

    async def handle(request: Request) -> Response:
        await request.read(1 << 20, 10.0)
        return Response(200, ANSWER.encode(), {"Content-Type": "application/json"})

    async def missing(request: Request) -> Response:
        return Response(404, b"")

    async def main() -> None:
        server = HttpServer(
            {("POST", "/v1/chat/completions"): handle}, head_timeout_s=20, max_body_bytes=1 << 20, not_found=missing
        )
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    loop = new_event_loop() if kind == "spendstream-uvloop" else asyncio.new_event_loop()
    loop.run_until_complete(main())


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no server on port {port}") from None
            time.sleep(0.05)


def main() -> None:
    from bench_gateway import cpu_seconds, pct
    from figures import figure, machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per server")
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks the requests are split into")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--serve", choices=["aiohttp", "spendstream", "spendstream-uvloop"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    machine("http_server")
    kinds = ["aiohttp", "spendstream", "spendstream-uvloop"]
    ports = {kind: free_port() for kind in kinds}
    processes = {
        kind: subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(ports[kind])])
        for kind in kinds
    }
    headers = {"Content-Type": "application/json"}
    try:
        for kind in kinds:
            wait_listening(ports[kind])
        cpu = dict.fromkeys(kinds, 0.0)
        latencies: dict[str, list[float]] = {kind: [] for kind in kinds}
        block = max(1, args.requests // args.rounds)
        for kind in kinds:  # warm-up
            asyncio.run(post_many(f"http://127.0.0.1:{ports[kind]}/v1/chat/completions", 500, 1, lambda: BODY, headers))
        for _ in range(args.rounds):
            for kind in kinds:
                url = f"http://127.0.0.1:{ports[kind]}/v1/chat/completions"
                before = cpu_seconds(processes[kind].pid)
                measured, _ = asyncio.run(post_many(url, block, args.concurrency, lambda: BODY, headers))
                cpu[kind] += cpu_seconds(processes[kind].pid) - before
                latencies[kind].extend(measured)
        total = block * args.rounds
        print(f"{total:,} POSTs per server at concurrency {args.concurrency}, {args.rounds} alternating blocks")
        print(f"  {'server':20} {'µs CPU/request':>15} {'p50 ms':>8}")
        per_request = {kind: cpu[kind] * 1e6 / len(latencies[kind]) for kind in kinds}
        for kind in kinds:
            print(f"  {kind:20} {per_request[kind]:15.1f} {pct(latencies[kind], 0.5):8.3f}")
        for kind in ("spendstream", "spendstream-uvloop"):
            name = f"HTTP server CPU per request, concurrency {args.concurrency}, {kind}"
            figure("http_server", name, per_request[kind], "µs", baseline=per_request["aiohttp"], baseline_of="aiohttp")
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(10)
        time.sleep(0.1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
