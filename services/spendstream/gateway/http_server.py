"""The gateway's HTTP/1.1 server: llhttp framing (through ``httptools``) on an asyncio protocol.

Why not aiohttp's server, which the API runs on: the gateway's whole budget is 0.35 ms of CPU a request
(docs/architecture.md §11), and answering a fixed JSON alone, aiohttp's server took 1.6-2x the CPU of this
protocol on the same parser, and about 2x on uvloop (``bench/bench_http_server.py`` runs the three side by side;
the README's table has its last run). uvicorn, the other llhttp server, sets no time limit on a request head.

What it does, and the gateway relies on:

* Keep-alive, and pipelined requests answered in order (the next one is read once its predecessor is answered).
* ``Expect: 100-continue`` is answered when the handler starts reading the body, so a request refused before
  (no key, too large) is answered at once and its body never sent (curl expects it above 1 KiB).
* A request head must arrive whole within ``head_timeout_s`` of the connection's opening or of the previous
  response, and stay under ``MAX_HEAD_BYTES``: a slow or endless head (slowloris) is cut off. An HTTP/1.1 head
  must name its ``Host``. Heads that cannot be framed get 400 (431, 405 for CONNECT, 505 for HTTP/2) and the
  connection closes.
* Bodies by ``Content-Length`` or chunked, read by the handler with its own size and time limits
  (:meth:`Request.read`); a body beyond the limit is not kept, and its connection closes after the answer.
  A body that cannot be framed (a bad chunk) fails the read with :class:`MalformedBody`.
* An upgrade offer (``Upgrade: h2c``, as ``curl --http2`` sends) is declined by answering in HTTP/1.1, its body
  read as usual.
* A connection closed while the client may still be sending is closed gracefully (our side first, the rest
  of its bytes read and dropped for ``LINGER_S``), so the client reads the answer instead of a reset.
* Responses are whole (:class:`Response`, one write) or streamed (:class:`StreamedResponse`, chunked, waiting
  while the client's socket buffer is full).
* :meth:`HttpServer.shutdown` stops listening, closes idle connections and lets requests in flight finish.
"""

from __future__ import annotations

import asyncio
import json
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
LINGER_S = 2.0  # how long the bytes a refused client still sends are read and dropped before the socket closes
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class BodyTooLarge(Exception):
    """The request body exceeds the limit its reader set."""


class MalformedBody(ConnectionError):
    """The request body cannot be framed (a bad chunk, an unsupported transfer coding)."""


class _Refused(Exception):
    """Raised in a parser callback: the request is answered with ``status`` and the connection closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str, kind: str = "invalid_request_error", *, anthropic: bool = False) -> bytes:
    """The OpenAI-style error body the gateway answers with (Anthropic clients also find ``type: error`` and
    ``error.type``)."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, "type": kind, "param": None}}
    if anthropic:
        body["type"] = "error"
    return json.dumps(body).encode()


class Headers(dict[str, str]):
    """Request headers by lower-cased name (the first of repeated ones); ``get`` takes a name in any case.
    ``repeated`` names a spendstream header given more than once (its value is ambiguous: the gateway refuses it)."""

    repeated: str = ""

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
        "_chunks",
        "_complete",
        "_connection",
        "_expects_continue",
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
            url = httptools.parse_url(target)
            path, query = url.path or b"/", url.query or b""
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")  # without the "?"; routes match the path alone
        self.headers = headers
        self.keep_alive: bool = parser.should_keep_alive()
        self.http_11 = parser.get_http_version() == "1.1"
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = connection.server.max_body_bytes  # read() may lower it: beyond it the body is not kept
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        expect = headers.get("expect")
        self._expects_continue = expect is not None and expect.lower() == "100-continue"

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
            connection = self._connection
            if connection.closed:
                raise ConnectionResetError("the client closed the connection before its body arrived")
            if connection.malformed is not None:
                raise MalformedBody(connection.malformed)
            if self._expects_continue:
                self._expects_continue = False
                connection.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
            self._waiter = connection.server.loop.create_future()
            connection.resume()
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
        connection.close_gracefully()


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
        self.malformed: str | None = None  # why the body under way cannot be framed
        self.head_deadline: float | None = None  # loop time by which a whole request head must have arrived
        self._in_head = False
        self._head_bytes = 0  # read since the head under way began (an endless header line is not in _head_size)
        self._head_size = 0  # of the request line and the header fields parsed so far
        self._hosts = 0  # Host headers beyond the first
        self._url = b""
        self._headers = Headers()
        self._request: Request | None = None  # the one whose body is arriving
        self._upgrade_offer: Request | None = None  # declined upgrade whose body the next parser reads
        self._continuing: Request | None = None
        self._queue: deque[Request] = deque()  # read, waiting for their turn
        self._busy = False  # a request is being answered
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._discarding = False  # what the client sends is dropped (it cannot be framed, or we are closing)
        self._lingering = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.head_deadline = self.server.loop.time() + self.server.head_timeout_s

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._decline_upgrade(data[exc.args[0] :] if exc.args else b"")
            return
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        if self._in_head:  # (counts from the read the head began in: bytes of a pipelined body before it too)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "request_head_too_large", f"the request head is larger than {MAX_HEAD_BYTES} bytes")

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
        self._head_size = 0
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        key = name.decode("latin-1").lower()
        if key not in self._headers:
            # Header values that are not UTF-8 keep their bytes as lone surrogates, for the handler to refuse.
            dict.__setitem__(self._headers, key, value.decode("utf-8", "surrogateescape"))
        elif key == "host":
            self._hosts += 1
        elif key.startswith("x-spendstream-"):
            self._headers.repeated = key

    def on_headers_complete(self) -> None:
        self.head_deadline = None
        self._in_head = False
        if self._continuing is not None:  # the framing of a declined upgrade's body: no request of its own
            self._request, self._continuing = self._continuing, None
            return
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refused(431, "request_head_too_large", f"the request head is larger than {MAX_HEAD_BYTES} bytes")
        parser = self.parser
        method = parser.get_method().decode("latin-1")
        if method == "CONNECT":
            raise _Refused(405, "method_not_allowed", "CONNECT is not served: this is an API gateway, not a proxy")
        headers = self._headers
        request = Request(self, method, self._url, headers, parser)
        if request.http_11 and "host" not in headers:
            raise _Refused(400, "malformed_request", "an HTTP/1.1 request must carry a Host header")
        if self._hosts:
            raise _Refused(400, "malformed_request", "a request must carry one Host header, not several")
        if parser.should_upgrade():
            # Declined: answered in HTTP/1.1, then closed. llhttp stops before the body of an upgrade offer, so a
            # request with one reads it through a new parser (see _decline_upgrade).
            self.must_close = True
            length = headers.get("content-length")
            if "chunked" in headers.get("transfer-encoding", "").lower() or (length and length.strip("0 ")):
                self._upgrade_offer = request
        if self.must_close:
            request.keep_alive = False
        self._request = request
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
        if request is not None and request is not self._upgrade_offer:
            request._finish()
        if not self._busy and not self._queue:
            self.head_deadline = self.server.loop.time() + self.server.head_timeout_s

    # -- parser outcomes --------------------------------------------------------------------------------
    def _decline_upgrade(self, rest: bytes) -> None:
        request, self._upgrade_offer = self._upgrade_offer, None
        if request is None:  # nothing follows that is ours to parse
            self.pause()
            return
        headers = request.headers
        framing = (
            b"Transfer-Encoding: chunked"
            if "chunked" in headers.get("transfer-encoding", "").lower()
            else b"Content-Length: %d" % int(headers.get("content-length", "0"))
        )
        self.parser = httptools.HttpRequestParser(self)
        self._continuing = request
        self.parser.feed_data(b"POST / HTTP/1.1\r\nHost: body\r\n" + framing + b"\r\n\r\n")
        if rest:
            self.data_received(rest)

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__cause__ or exc.__context__  # httptools raises its own error while handling the callback's
        if isinstance(cause, _Refused):
            self._refuse(cause.status, cause.code, cause.message)
            return
        detail = str(exc)
        if "PRI" in detail:
            self._refuse(505, "http_version_not_supported", "HTTP/2 is not served here: send HTTP/1.1")
            return
        request = self._request
        if request is not None:  # its head was fine, its body is not: the handler's read() says so
            self.malformed = f"the request body cannot be framed ({detail})"
            self.must_close = True
            request._wake(MalformedBody(self.malformed))
            self._discarding = True
            return
        self._refuse(400, "malformed_request", f"malformed HTTP request: {detail}")

    # -- answering ----------------------------------------------------------------------------------------
    def _start(self, request: Request) -> None:
        self._busy = True
        self._task = self.server.loop.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        server = self.server
        started = time.perf_counter()
        route = server.route_of(request)
        try:
            response = await server.dispatch(route, request)
        except MalformedBody as exc:
            response = Response(400, error_body("malformed_request", str(exc)), {"Content-Type": "application/json"})
        except (ConnectionError, asyncio.CancelledError):
            response = None
            self.must_close = True
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            body = error_body("internal_error", "internal error", "api_error")
            response = Response(500, body, {"Content-Type": "application/json"})
        still_sending = not request._complete  # its body is still arriving (unread, or beyond the limit)
        if still_sending:
            self.must_close = True
        if isinstance(response, Response):
            if not self.closed:
                self.write_head(request, response.status, response.headers, response.body)
        elif isinstance(response, StreamedResponse) and not response._finished:
            self.must_close = True
        if response is not None and server.observe is not None:
            server.observe(route or "unmatched", response.status, time.perf_counter() - started)
        self._busy = False
        self._task = None
        if self.closed:
            return
        if self.must_close or not request.keep_alive or server.closing:
            if still_sending or self._discarding:
                self.close_gracefully()
            else:
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
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()]).encode("latin-1", "replace")
        parts = [b"HTTP/1.1 %d %b\r\nServer: spendstream\r\n" % (status, _REASONS.get(status, b"Unknown")),
                 _DATE.line(), lines]  # fmt: skip
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

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer a request that cannot be parsed, then close: what follows on the connection cannot be framed."""
        self.head_deadline = None
        self.must_close = True
        if self._busy:  # a pipelined head: the request being answered is answered first, then the connection closes
            self._discarding = True
            return
        if self.transport is not None and not self.closed:
            body = error_body(code, message)
            self.transport.write(
                b"HTTP/1.1 %d %b\r\nServer: spendstream\r\n%bContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (status, _REASONS[status], _DATE.line(), len(body), body)
            )
            if self.server.observe is not None:
                self.server.observe("unmatched", status, 0.0)
        self.close_gracefully()

    def close_gracefully(self) -> None:
        """Close our side once the answer is sent, and read and drop what the client still sends for ``LINGER_S``:
        closing a socket with unread bytes resets it, and the client would lose the answer."""
        transport = self.transport
        if transport is None or self.closed or self._lingering:
            return
        self._lingering = self._discarding = True
        self.head_deadline = None
        if transport.can_write_eof():
            transport.write_eof()
            self.resume()
            self.server.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close_if_idle(self) -> None:
        if not self._busy and self._request is None and not self._queue and self.transport is not None:
            self.transport.close()


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
        """Stop listening, close idle connections, give requests in flight ``timeout_s`` to finish, then cancel
        those still running (their handlers' cleanup runs: a cut stream is still metered) and close the rest."""
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
        running = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=5.0)
        await asyncio.sleep(0)  # what the cancelled handlers scheduled (their usage events) runs
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
