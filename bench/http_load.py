"""A lean HTTP/1.1 load generator: keep-alive connections, one request in flight on each, llhttp framing.

The benchmarks measure the gateway, so the load generator must cost as little CPU as it can: on a 2-core machine
every millisecond it spends is taken from the gateway and the stub upstream. aiohttp's client costs about
0.2 ms of CPU per request here; this one writes prebuilt request bytes and frames answers with ``httptools``
(llhttp), at a fraction of that (``bench_gateway.py`` prints the load generator's own CPU per request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools


class _Exchange(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends one request and waits for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._done: asyncio.Future[None] | None = None
        self.status = 0
        self.first_byte_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection"))

    # llhttp callbacks
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.first_byte_at:
            self.first_byte_at = time.perf_counter()

    def on_message_complete(self) -> None:
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        done = self._done
        if done is not None and not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    async def request(self, message: bytes) -> None:
        assert self.transport is not None
        self.status, self.first_byte_at = 0, 0.0
        self._done = asyncio.get_running_loop().create_future()
        self.transport.write(message)
        await self._done


def request_bytes(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A POST of ``body`` to ``url`` as it goes on the wire."""
    parts = urlsplit(url)
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def post_many(
    url: str,
    requests: int,
    concurrency: int,
    make_body: Callable[[], bytes],
    headers: dict[str, str],
    first_bytes: list[float] | None = None,
) -> tuple[list[float], float]:
    """Latencies (ms) of ``requests`` POSTs over ``concurrency`` connections, and the elapsed seconds.

    ``first_bytes`` collects the time (ms) to the first byte of each response body. A status other than 200
    raises: a benchmark of refused requests would measure the wrong thing.
    """
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(_Exchange, parts.hostname, parts.port))[1] for _ in range(concurrency)]
    latencies: list[float] = []
    remaining = requests

    async def worker(exchange: _Exchange) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            message = request_bytes(url, make_body(), headers)
            start = time.perf_counter()
            await exchange.request(message)
            end = time.perf_counter()
            if exchange.status != 200:
                raise RuntimeError(f"{url} answered {exchange.status}")
            if first_bytes is not None:
                first_bytes.append(((exchange.first_byte_at or end) - start) * 1000)
            latencies.append((end - start) * 1000)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(exchange) for exchange in connections))
    finally:
        for exchange in connections:
            if exchange.transport is not None:
                exchange.transport.close()
    return latencies, time.perf_counter() - started
