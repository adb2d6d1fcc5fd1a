"""Response framing: the gateway's ``ResponseParser`` against a baseline version of it, on the same bytes.

Three shapes a gateway reads from a provider: a chat.completions JSON answer (one read), a streamed answer of
40 SSE events in a chunked body (one read per event, as the events arrive), and a 256 KiB body read in 64 KiB
pieces. The baseline is ``ResponseParser`` as it was at ``--baseline`` (a git revision; the default is the
hand-written parser that llhttp replaced). Both run in alternating rounds; microseconds per response, best of
the rounds and median. With ``--gateway-runs N``, ``bench_gateway.py`` then runs N times for each side
(the baseline revision's code exported from git, and this tree), alternately, and its added p50 and req/s
are printed per run.
Run: .venv/bin/python bench/bench_response_framing.py [--rounds 15] [--baseline REV] [--gateway-runs 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from spendstream.gateway.upstream_client import ResponseParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quota_overshoot import machine

HAND_WRITTEN = "f561380bc3c332e69c23ede6ea9c2a359779b994"  # the last revision with the hand-written parser
MODULE = "services/spendstream/gateway/upstream_client.py"

HEAD = (
    b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Dec 2026 06:00:00 GMT\r\nContent-Type: %s\r\n%s"
    b"Connection: keep-alive\r\nopenai-organization: org-abc\r\nopenai-processing-ms: 412\r\n"
    b"openai-version: 2020-10-01\r\nx-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\n"
    b"x-request-id: req_0123456789abcdef\r\nServer: cloudflare\r\n\r\n"
)
JSON_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Four words, as asked."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}'
)


def shapes() -> dict[str, list[bytes]]:
    """Each shape as the list of reads the socket would deliver."""
    json_answer = HEAD % (b"application/json", b"Content-Length: %d\r\n" % len(JSON_BODY)) + JSON_BODY
    events = [
        b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"word %d "}}]}\n\n' % i for i in range(40)
    ]
    stream = [HEAD % (b"text/event-stream", b"Transfer-Encoding: chunked\r\n")]
    stream += [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    stream.append(b"0\r\n\r\n")
    big = b"x" * (256 * 1024)
    big_answer = HEAD % (b"application/json", b"Content-Length: %d\r\n" % len(big)) + big
    return {
        "json, 1 read": [json_answer],
        "sse 40 events": stream,
        "256 KiB, 64 KiB reads": [big_answer[i : i + 65536] for i in range(0, len(big_answer), 65536)],
    }


def baseline_parser(revision: str) -> type:
    """``ResponseParser`` from ``revision`` of the upstream client, loaded from git without touching the tree."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:{MODULE}"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("baseline_upstream_client")
    sys.modules[module.__name__] = module  # dataclass-style introspection needs the module registered
    exec(compile(source, f"{revision[:12]}:{MODULE}", "exec"), module.__dict__)
    return module.ResponseParser


def export_services(revision: str, into: Path) -> Path:
    """``revision`` written under ``into`` (the code reads schemas from the tree); returns its ``services``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", revision], cwd=root, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "services"


def gateway_figures(services: Path, requests: int) -> str:
    """One ``bench_gateway.py`` run with ``services`` first on the path: its per-target rows and added latency."""
    script = Path(__file__).resolve().parent / "bench_gateway.py"
    env = {**os.environ, "PYTHONPATH": str(services)}
    result = subprocess.run(
        [sys.executable, str(script), "--requests", str(requests), "--rounds", "5"],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    keep = ("  gateway", "  direct", "added by")
    return "\n".join(line for line in result.stdout.splitlines() if line.startswith(keep))


def time_per_response(parser_type: Callable[[], ResponseParser], reads: list[bytes], repeat: int) -> float:
    """Microseconds to frame one response (all its reads), averaged over ``repeat`` responses."""
    start = time.perf_counter()
    for _ in range(repeat):
        parser = parser_type()
        for data in reads:
            parser.feed(data)
        assert parser.complete
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per shape")
    parser.add_argument("--repeat", type=int, default=2000, help="responses per round")
    parser.add_argument("--baseline", default=HAND_WRITTEN, help="git revision whose ResponseParser is the baseline")
    parser.add_argument("--gateway-runs", type=int, default=0, help="bench_gateway.py runs per side, alternating")
    parser.add_argument("--gateway-requests", type=int, default=2000, help="requests per bench_gateway.py block")
    args = parser.parse_args()
    baseline = baseline_parser(args.baseline)
    candidates = {f"baseline {args.baseline[:8]}": baseline, "llhttp (httptools)": ResponseParser}
    print(f"machine: {machine()}")
    print(f"us per response, {args.rounds} alternating rounds of {args.repeat:,} responses: best / median")
    for shape, reads in shapes().items():
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.rounds):
            for name, parser_type in candidates.items():
                samples[name].append(time_per_response(parser_type, reads, args.repeat))
        cells = "   ".join(
            f"{name} {min(values):7.2f} / {statistics.median(values):7.2f}" for name, values in samples.items()
        )
        print(f"  {shape:22} {cells}")
    print(f"load average after: {machine().rsplit('load average ', 1)[1]}")
    if not args.gateway_runs:
        return
    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            f"baseline {args.baseline[:8]}": export_services(args.baseline, Path(tmp)),
            "this tree": Path(__file__).resolve().parent.parent / "services",
        }
        for run in range(1, args.gateway_runs + 1):
            for name, services in sides.items():
                print(f"bench_gateway.py run {run}, {name} (load average {os.getloadavg()[0]:.2f}):", flush=True)
                print(gateway_figures(services, args.gateway_requests), flush=True)


if __name__ == "__main__":
    main()
