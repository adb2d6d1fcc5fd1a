"""The gateway's HTTP/1.1 server: llhttp framing (through ``httptools``) on an asyncio protocol.

Why not aiohttp's server, which the API runs on: answering a fixed JSON at concurrency 1 on the reference machine,
aiohttp's server cost 79-94 µs of CPU per request, this protocol on the same parser 22-27 µs (15-18 on uvloop), and
uvicorn 37 µs with no time limit on a request head. The gateway's whole budget is 350 µs a request
(docs/architecture.md §11), so the server was a quarter of it.

What it does, and the gateway relies on:

* Keep-alive, and pipelined requests answered in order (the next one is read once its predecessor is answered).
* ``Expect: 100-continue`` is answered before the body is read (curl sends it with every body above 1 KiB).
* A request head must arrive whole within ``head_timeout_s`` of the connection's opening or of the previous
  response, and stay under ``MAX_HEAD_BYTES``: a slow or endless head (slowloris) is cut off.
* Bodies by ``Content-Length`` or chunked, read by the handler with its own size and time limits
  (:meth:`Request.read`); a body beyond the limit is not kept, and its connection closes after the answer.
* Responses are whole (:class:`Response`, one write) or streamed (:class:`StreamedResponse`, chunked, waiting
  while the client's socket buffer is full).
* :meth:`HttpServer.shutdown` stops listening, closes idle connections and lets requests in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
MAX_PIPELINED = 16  # requests read ahead of the one being answered; reading pauses beyond
SWEEP_S = 0.5  # how often idle connections are checked against the head timeout
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class BodyTooLarge(Exception):
    """The request body exceeds the limit its reader set."""


class Headers(dict[str, str]):
    """Request headers by lower-cased name (the first of repeated ones); ``get`` takes a name in any case."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name.lower() if isinstance(name, str) else name)


class Response:
    """A whole response, written at once with its ``Content-Length``."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


class Request:
    """One request as its head arrived; its body is read with :meth:`read`."""

    __slots__ = (
        "_answered",
        "_chunks",
        "_complete",
        "_connection",
        "_limit",
        "_size",
        "_waiter",
        "headers",
        "http_11",
        "keep_alive",
        "method",
        "path",
        "query",
    )  # fmt: skip

    def __init__(self, connection: _Connection, method: str, target: bytes, headers: Headers, parser: Any) -> None:
        self._connection = connection
        self.method = method
        path, _, query = target.partition(b"?")
        if not path.startswith(b"/"):  # absolute form (a client that takes us for a proxy): keep the path
            path = httptools.parse_url(target).path or b"/"
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.headers = headers
        self.keep_alive: bool = parser.should_keep_alive()
        self.http_11 = parser.get_http_version() == "1.1"
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = connection.server.max_body_bytes  # read() may lower it: beyond it the body is not kept
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._answered = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._connection.transport

    @property
    def content_type(self) -> str:
        """The media type, lower-cased, without parameters (``application/octet-stream`` when none is given)."""
        value = self.headers.get("content-type")
        if not value:
            return "application/octet-stream"
        return value.partition(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self, limit: int, timeout_s: float) -> bytes:
        """The whole body, up to ``limit`` bytes (``BodyTooLarge`` beyond); what has not arrived yet must arrive
        within ``timeout_s`` (``TimeoutError``), so a client that sends its body slowly cannot hold the handler."""
        self._limit = limit
        if self._size > limit:
            self._chunks.clear()
            raise BodyTooLarge
        if not self._complete:
            if self._connection.closed:
                raise ConnectionResetError("the client closed the connection before its body arrived")
            self._waiter = asyncio.get_running_loop().create_future()
            self._connection.resume()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            finally:
                self._waiter = None
            if self._size > limit:
                self._chunks.clear()
                raise BodyTooLarge
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def stream(self, status: int, headers: Mapping[str, str]) -> StreamedResponse:
        """A response whose body is written as it is produced (chunked)."""
        return StreamedResponse(self, status, headers)

    # -- fed by the connection ------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= self._limit:
            self._chunks.append(data)
        else:
            self._chunks.clear()
            self._wake(None)

    def _finish(self) -> None:
        self._complete = True
        self._wake(None)

    def _wake(self, exc: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


class StreamedResponse:
    """A chunked response: ``prepare`` sends the head, ``write`` each piece, ``write_eof`` the end; ``abort`` closes
    the connection without the end, so the client sees the body is incomplete."""

    __slots__ = ("_finished", "_request", "headers", "prepared", "status")

    def __init__(self, request: Request, status: int, headers: Mapping[str, str]) -> None:
        self._request = request
        self.status = status
        self.headers = headers
        self.prepared = False
        self._finished = False

    async def prepare(self) -> None:
        connection = self._request._connection
        connection.write_head(self._request, self.status, self.headers, None)
        self.prepared = True
        await connection.drain()

    async def write(self, data: bytes) -> None:
        connection = self._request._connection
        if connection.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._request.http_11:
            connection.transport.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
        else:
            connection.transport.write(data)  # type: ignore[union-attr]
        await connection.drain()

    async def write_eof(self) -> None:
        connection = self._request._connection
        if self._request.http_11 and not connection.closed:
            connection.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        self._finished = True

    def abort(self) -> None:
        """Close the connection once what was written is sent, without the terminating chunk."""
        connection = self._request._connection
        connection.must_close = True
        if connection.transport is not None:
            connection.transport.close()


Handler = Callable[[Request], Awaitable["Response | StreamedResponse"]]
Observer = Callable[[str, int, float], None]  # (route, status, seconds) once a response is written


class _DateHeader:
    """The ``Date`` header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_DATE = _DateHeader()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.must_close = False
        self.head_deadline: float | None = None  # loop time by which a whole request head must have arrived
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers = Headers()
        self._request: Request | None = None  # the one whose body is arriving
        self._queue: deque[Request] = deque()  # read, waiting for their turn
        self._busy = False  # a request is being answered
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.head_deadline = self.server.loop.time() + self.server.head_timeout_s

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade offer (h2c, websocket) on a request without a body: answered in HTTP/1.1, then closed,
            # since the bytes after it are not ours to parse.
            self.must_close = True
            self.pause()
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head:  # (counts from the read the head began in: bytes of a pipelined body before it too)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        gone = ConnectionResetError("the client closed the connection")
        if self._request is not None:
            self._request._wake(gone)
        for request in self._queue:
            request._wake(gone)
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(gone)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks -------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = Headers()
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key not in self._headers:
            # Header values that are not UTF-8 keep their bytes as lone surrogates, for the handler to refuse.
            dict.__setitem__(self._headers, key, value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self.head_deadline = None
        self._in_head = False
        parser = self.parser
        request = self._request = Request(self, parser.get_method().decode("latin-1"), self._url, self._headers,
                                          parser)  # fmt: skip
        if self.must_close:
            request.keep_alive = False
        if self._busy or self._queue:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED:
                self.pause()
        else:
            self._start(request)

    def on_body(self, body: bytes) -> None:
        if self._request is not None:
            self._request._feed(body)

    def on_message_complete(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            request._finish()
        if not self._busy and not self._queue:
            self.head_deadline = self.server.loop.time() + self.server.head_timeout_s

    # -- answering ----------------------------------------------------------------------------------------
    def _start(self, request: Request) -> None:
        self._busy = True
        expect = request.headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.server.loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        server = self.server
        started = time.perf_counter()
        route = server.route_of(request)
        try:
            response = await server.dispatch(route, request)
        except (ConnectionError, asyncio.CancelledError):
            response = None
            self.must_close = True
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = Response(500, b'{"error":{"message":"internal error","type":"api_error"}}',
                                {"Content-Type": "application/json"})  # fmt: skip
        request._answered = True
        if not request._complete:  # its body is still arriving (unread, or beyond the limit): do not parse on
            self.must_close = True
        if isinstance(response, Response):
            if not self.closed:
                self.write_head(request, response.status, response.headers, response.body)
        elif isinstance(response, StreamedResponse) and not response._finished:
            self.must_close = True
        if response is not None and server.observe is not None:
            server.observe(route or "unmatched", response.status, time.perf_counter() - started)
        self._busy = False
        if self.closed:
            return
        if self.must_close or not request.keep_alive or server.closing:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self._queue:
            self._start(self._queue.popleft())
            if self._paused and len(self._queue) < MAX_PIPELINED // 2:
                self.resume()
        elif self._request is None:
            self.head_deadline = server.loop.time() + server.head_timeout_s

    def write_head(self, request: Request, status: int, headers: Mapping[str, str], body: bytes | None) -> None:
        """The status line and headers, with the body of a whole response (``None``: a streamed one follows)."""
        close = self.must_close or not request.keep_alive or self.server.closing
        parts = [b"HTTP/1.1 %d %b\r\nServer: spendstream\r\n" % (status, _REASONS.get(status, b"Unknown")),
                 _DATE.line()]  # fmt: skip
        for name, value in headers.items():
            parts.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
        if body is not None:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        elif request.http_11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.must_close = close = True  # an HTTP/1.0 stream ends when the connection does
        if close:
            parts.append(b"Connection: close\r\n")
        elif not request.http_11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if body and request.method != "HEAD":
            parts.append(body)
        self.transport.write(b"".join(parts))  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._writing_paused:
            self._drain = self.server.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed, then close: what follows on the connection cannot be framed."""
        self.head_deadline = None
        if self.transport is not None and not self.closed and not self._busy:
            body = b'{"error":{"message":"%b","type":"invalid_request_error"}}' % message.encode().replace(b'"', b"'")
            head = (
                b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            )
            self.transport.write(head % (status, _REASONS[status], len(body)) + body)
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close_if_idle(self) -> bool:
        if not self._busy and self._request is None and not self._queue and self.transport is not None:
            self.transport.close()
            return True
        return False


class HttpServer:
    """Routes (method, path) to handlers and serves them on one listening socket."""

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        *,
        head_timeout_s: float,
        max_body_bytes: int,
        not_found: Handler,
        observe: Observer | None = None,
    ) -> None:
        self.routes = dict(routes)
        self._paths = {path for _, path in self.routes}
        self.head_timeout_s = head_timeout_s
        self.max_body_bytes = max_body_bytes  # kept of a body no handler has read yet
        self.not_found = not_found
        self.observe = observe
        self.connections: set[_Connection] = set()
        self.closing = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def route_of(self, request: Request) -> str | None:
        """The route a request matched (its path), or None."""
        return request.path if request.path in self._paths else None

    def methods_of(self, path: str) -> list[str]:
        """The methods served on ``path`` (none: an unknown path)."""
        return sorted(method for method, route in self.routes if route == path)

    async def dispatch(self, route: str | None, request: Request) -> Response | StreamedResponse:
        handler = self.routes.get((request.method, request.path))
        if handler is None and request.method == "HEAD":
            handler = self.routes.get(("GET", request.path))
        if handler is None:
            return await self.not_found(request)
        return await handler(request)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Close connections whose request head did not arrive in time."""
        now = self.loop.time()
        for connection in list(self.connections):
            deadline = connection.head_deadline
            if deadline is not None and now > deadline and connection.transport is not None:
                connection.transport.close()
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop listening, close idle connections, and give requests in flight ``timeout_s`` to finish."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self.loop.time() + timeout_s
        while self.connections and self.loop.time() < deadline:
            for connection in list(self.connections):
                connection.close_if_idle()
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
