"""A lean HTTP/1.1 client for the gateway's upstream calls: keep-alive pools over asyncio protocols.

Why not a general-purpose client: the gateway forwards one request shape (a method, a path, a few headers,
a body already in memory) to a handful of fixed upstreams, and each general-purpose layer (URL objects,
cookie jars, tracing hooks, per-request timeout contexts, stream readers) costs as much CPU as the
gateway's own work. Here a request is one ``transport.write`` on a pooled connection and a response is
framed by ``ResponseParser`` over llhttp (Node.js's parser, through ``httptools``), with no I/O of its own,
tested on its own.

Semantics the gateway relies on:

* ``Accept-Encoding: identity`` is always sent: the gateway reads usage from the body, so it must see it
  uncompressed, and it forwards the body as it came.
* ``read_timeout_s`` is the longest silence while waiting for bytes (the head, or the next body bytes),
  like a socket read timeout; a streamed response may take as long as it likes in total.
* A connection goes back to its pool only after its response was read to the end and neither side asked
  to close; anything else (an error, a response abandoned half-way) closes it.
* Idle connections are dropped after ``KEEPALIVE_S`` or as soon as the upstream closes them. A request
  whose reused connection turns out to be closed before any response byte arrived is sent once more on a
  new connection (the upstream closed it while idle, so it never saw the request).
* An egress proxy named by ``HTTPS_PROXY`` / ``HTTP_PROXY`` (or their lower-case forms, which win) is used
  unless ``NO_PROXY`` lists the upstream's host: an https upstream is reached through a CONNECT tunnel (TLS
  is end to end), an http one by absolute-form requests to the proxy. Credentials in the proxy URL are sent
  as ``Proxy-Authorization`` (Basic) and appear in no message, log or repr.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import unquote, urlsplit

import httptools

from spendstream.core.config import ConfigError

KEEPALIVE_S = 15.0  # below the idle timeout of common upstream servers, so they rarely close one under us
MAX_IDLE_PER_UPSTREAM = 64
MAX_HEAD_BYTES = 64 * 1024
PAUSE_ABOVE_BYTES = 1 << 20  # a slow downstream reader pauses the upstream socket past this much buffered body
USER_AGENT = "spendstream-gateway"
_NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamProtocolError(ConnectionError):
    """The upstream's answer is not HTTP/1.x we can frame (bad head, bad chunk, cut short)."""


class UpstreamDisconnected(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class ResponseParser:
    """Incremental HTTP/1.x response framing over llhttp (``httptools``): feed bytes, get body pieces; no I/O.

    After the head: ``status``, ``headers`` (lower-case names; repeated headers joined with ``", "``) and
    ``keep_alive``. ``complete`` turns True once the body ended (for a read-until-close body: at EOF).
    llhttp frames the bytes; this class adds what a client of one request per exchange needs: interim (1xx)
    heads skipped, a bound on the head's size, bytes past the end of the response refused.
    """

    __slots__ = (
        "_body",
        "_head_bytes",
        "_headers_done",
        "_llhttp",
        "_until_close",
        "complete",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self) -> None:
        self._llhttp = httptools.HttpResponseParser(self)
        self.status = 0  # 0 until the (final) head is parsed
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.complete = False
        self._body: list[bytes] = []
        self._head_bytes = 0
        self._headers_done = False  # of the head being parsed (an interim head resets it)
        self._until_close = False

    def feed(self, data: bytes) -> list[bytes]:
        """Body bytes contained in ``data``; raises ``UpstreamProtocolError`` on malformed input."""
        if self.complete:
            if data:
                raise UpstreamProtocolError("bytes after the end of the response")
            return []
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, UpstreamProtocolError):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserError as exc:
            raise _protocol_error(str(exc)) from None
        if not self.status:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                raise UpstreamProtocolError(f"response head longer than {MAX_HEAD_BYTES} bytes")
        body = self._body
        if body:
            self._body = []
        return body

    def feed_eof(self) -> None:
        """The upstream closed its side: the end of a read-until-close body, or a response cut short."""
        if self.complete:
            return
        if self._until_close:
            self.complete = True
            self.keep_alive = False
            return
        raise UpstreamDisconnected("the upstream closed the connection before the response was complete")

    # -- llhttp callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            too_long = "content-length" in self.headers
            raise UpstreamProtocolError(
                "more body bytes than Content-Length announced" if too_long else "bytes after the end of the response"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer after a chunked body: not part of the response's headers
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").rstrip(" \t")
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        status = self._llhttp.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the real response follows
            self.headers = {}
            return
        self._headers_done = True
        self.status = status
        self.keep_alive = self._llhttp.should_keep_alive()
        headers = self.headers
        self._until_close = (
            status not in _NO_BODY_STATUSES
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._headers_done:
            self.complete = True


def _protocol_error(reason: str) -> UpstreamProtocolError:
    """llhttp's reason, prefixed with what it means for the response (the tests and logs read the prefix)."""
    lowered = reason.lower()
    if "status" in lowered or "expected http/" in lowered:
        what = "not an HTTP/1.x status line"
    elif "content-length" in lowered:
        what = "bad Content-Length"
    elif "chunk size" in lowered:
        what = "bad chunk size"
    elif "after chunk data" in lowered:
        what = "chunk data longer than its size"
    elif "header" in lowered:
        what = "malformed header line"
    else:
        what = "malformed response"
    return UpstreamProtocolError(f"{what}: {reason}")


class UpstreamResponse:
    """One response: ``status`` and ``headers`` are set; read the body with ``read()`` or ``iter_chunks()``.

    Use it as an async context manager (or call ``release()``): that returns the connection to the pool
    when the body was read to the end, and closes it otherwise.
    """

    def __init__(self, connection: _Connection, parser: ResponseParser) -> None:
        self._connection = connection
        self._parser = parser
        self.status = parser.status
        self.headers = parser.headers

    async def read(self) -> bytes:
        """The whole body."""
        pieces = []
        next_piece = self._connection.next_body_piece
        while (piece := await next_piece()) is not None:
            pieces.append(piece)
        return b"".join(pieces)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (at least one byte per item)."""
        connection = self._connection
        while True:
            piece = await connection.next_body_piece()
            if piece is None:
                return
            yield piece

    def release(self) -> None:
        self._connection.finish()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: ResponseParser | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._received_any = False
        self._last_data_at = 0.0
        self._timeout = 0.0  # of the response under way
        self._watchdog: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes on an idle connection: it is out of step, never reuse it
            self._close()
            return
        self._received_any = True
        self._last_data_at = self._loop.time()
        try:
            pieces = parser.feed(data)
        except UpstreamProtocolError as exc:
            self._fail(exc)
            return
        if pieces:
            self._body.extend(pieces)
            self._buffered += sum(map(len, pieces))
            if self._buffered > PAUSE_ABOVE_BYTES and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        if parser.status:  # the head is in: whoever waits has something to look at
            self._wake()

    def eof_received(self) -> bool:
        parser = self._parser
        if parser is not None:
            try:
                parser.feed_eof()
            except UpstreamDisconnected as exc:
                self._fail(exc)
            self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._parser is not None and not self._parser.complete:
            self._fail(exc or UpstreamDisconnected("the upstream closed the connection"))

    # -- request/response ------------------------------------------------------------------------
    async def exchange(self, message: bytes, read_timeout: float) -> ResponseParser:
        """Send one request; return the parser once the head is in (the body follows via next_body_piece)."""
        assert self.transport is not None
        parser = self._parser = ResponseParser()
        self._error = None
        self._received_any = False
        self._last_data_at = self._loop.time()
        self._arm_watchdog(read_timeout)
        self.transport.write(message)
        while not parser.status:
            await self._wait()
        return parser

    async def next_body_piece(self) -> bytes | None:
        """The next body bytes, or None at the end of the body."""
        while True:
            if self._body:
                piece = self._body.popleft()
                self._buffered -= len(piece)
                if self._paused and self._buffered <= PAUSE_ABOVE_BYTES // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return piece
            parser = self._parser
            if parser is None or parser.complete:
                return None
            await self._wait()

    def finish(self) -> None:
        """Back to the pool if the response was read to the end and may be kept; closed otherwise."""
        parser = self._parser
        reusable = parser is not None and parser.complete and parser.keep_alive and not self._body
        self._parser = None
        self._body.clear()
        self._buffered = 0
        if reusable and not self.closed and self._error is None:
            self.idle_since = self._loop.time()
            self._pool.put_idle(self)
        else:
            self._close()

    @property
    def untouched(self) -> bool:
        """Nothing of the response arrived: a reused connection the upstream had closed while it was idle."""
        return not self._received_any

    # -- internals -------------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()
        self._close()

    def _close(self) -> None:
        self._cancel_watchdog()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _arm_watchdog(self, timeout: float) -> None:
        """A silence longer than ``timeout`` fails the response. The timer outlives a response on a kept connection
        and is re-armed from the last bytes when it fires, so a request on a busy connection costs no timer."""
        self._timeout = timeout
        due = self._last_data_at + timeout
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > due:  # (a shorter timeout than the previous response's)
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = self._loop.call_at(due, self._check_silence)

    def _check_silence(self) -> None:
        parser = self._parser
        if parser is None or parser.complete:  # idle: armed again by the next request
            self._watchdog = None
            return
        due = self._last_data_at + self._timeout
        if self._loop.time() >= due:
            self._watchdog = None
            self._fail(TimeoutError(f"no bytes from the upstream for {self._timeout:g} s"))
        else:
            self._watchdog = self._loop.call_at(due, self._check_silence)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP egress proxy; ``authorization`` is the ``Proxy-Authorization`` value ('' without credentials)."""

    host: str
    port: int
    authorization: str = field(default="", repr=False)

    @property
    def address(self) -> str:
        """``host:port``, for messages (never the credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, variable: str) -> Proxy:
        """Parse ``http://[user:password@]host[:port]`` (a bare ``host:port`` too, as curl reads it)."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        try:
            port = parts.port or 80
        except ValueError:
            port = 0
        if parts.scheme != "http" or not parts.hostname or not port:
            # Never repeat the URL: it may carry a password.
            raise ConfigError(f"{variable} must be an http://host[:port] proxy URL (got scheme {parts.scheme!r})")
        authorization = ""
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
        return cls(parts.hostname, port, authorization)


def proxy_from_environment(scheme: str, host: str, port: int) -> Proxy | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY`` name for an ``scheme://host:port`` upstream, unless ``NO_PROXY``
    exempts it (a host, a domain suffix with or without a leading dot, ``host:port``, or ``*``)."""
    proxies = urllib.request.getproxies_environment()  # lower-case names win, as curl and requests read them
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(f"{host}:{port}", proxies):
        return None
    return Proxy.from_url(url, f"{scheme.upper()}_PROXY (or {scheme}_proxy)")


class _TunnelHandshake(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; the connection then carries TLS to the upstream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.parser = ResponseParser()
        self.answered: asyncio.Future[int] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            return
        try:
            self.parser.feed(data)
        except ConnectionError as exc:
            self.answered.set_exception(exc)
            return
        if self.parser.status:
            self.answered.set_result(self.parser.status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(
                UpstreamDisconnected("the proxy closed the connection before answering CONNECT")
            )


class UpstreamPool:
    """Keep-alive connections to one upstream base URL (``http`` or ``https``, optionally with a path prefix)."""

    def __init__(self, base_url: str, *, connect_timeout_s: float, read_timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base URL must be http(s)://host[:port][/path], got {base_url!r}")
        self.base_url = base_url
        self.host = parts.hostname
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        default_port = self.port == (443 if tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.authority = f"{host}:{self.port}"  # CONNECT's target always names the port
        self.prefix = parts.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.proxy = proxy_from_environment(parts.scheme, self.host, self.port)
        self._request_lines = [f"Host: {self.host_header}", f"User-Agent: {USER_AGENT}", "Accept-Encoding: identity"]
        self._target_prefix = self.prefix
        if self.proxy is not None and not tls:  # absolute-form requests to the proxy; https goes through CONNECT
            self._target_prefix = f"http://{self.host_header}{self.prefix}"
            if self.proxy.authorization:
                self._request_lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> UpstreamResponse:
        """Send a request and return once the response head is in; raises ``TimeoutError`` or ``ConnectionError``."""
        message = self._message(method, path, body, headers)
        connection = self._take_idle()
        if connection is not None:
            try:
                return self._checked(
                    UpstreamResponse(connection, await connection.exchange(message, self.read_timeout_s))
                )
            except BaseException as exc:
                connection.finish()
                if not (isinstance(exc, ConnectionError) and connection.untouched):
                    raise
        connection = await self._connect()
        try:
            return self._checked(UpstreamResponse(connection, await connection.exchange(message, self.read_timeout_s)))
        except BaseException:
            connection.finish()
            raise

    def _checked(self, response: UpstreamResponse) -> UpstreamResponse:
        """A 407 comes from the egress proxy, not the upstream: a failure to reach it, not an answer to pass on."""
        if response.status == 407 and self.proxy is not None:
            raise ConnectionRefusedError(
                f"the proxy {self.proxy.address} refused the request to {self.authority}: 407 (Proxy Authentication "
                "Required)"
            )
        return response

    def _message(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> bytes:
        fields = [f"{name}: {value}" for name, value in headers.items()]
        supplied = "".join(fields) + path
        if "\r" in supplied or "\n" in supplied:
            raise ValueError("a header or the path contains a line break")
        lines = [f"{method} {self._target_prefix}{path} HTTP/1.1", *self._request_lines, *fields]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        return message + body if body else message

    def _take_idle(self) -> _Connection | None:
        now = self.loop.time()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.finish()  # closes it: stale or already closed
        return None

    async def _connect(self) -> _Connection:
        try:
            connection = await asyncio.wait_for(self._open_connection(), self.connect_timeout_s)
        except TimeoutError as exc:
            via = f" through the proxy {self.proxy.address}" if self.proxy is not None else ""
            took = f"connecting to {self.host}:{self.port}{via} took longer than {self.connect_timeout_s:g} s"
            raise TimeoutError(took) from exc
        self._open.add(connection)
        return connection

    async def _open_connection(self) -> _Connection:
        proxy = self.proxy
        if proxy is None or self.ssl is None:  # direct, or to the proxy that takes absolute-form requests
            host, port = (self.host, self.port) if proxy is None else (proxy.host, proxy.port)
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self), host, port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
            )
            return connection
        return await self._open_tunnel(proxy, self.ssl)

    async def _open_tunnel(self, proxy: Proxy, tls: ssl.SSLContext) -> _Connection:
        """CONNECT through ``proxy``, then TLS with the upstream inside the tunnel."""
        transport, handshake = await self.loop.create_connection(
            lambda: _TunnelHandshake(self.loop), proxy.host, proxy.port
        )
        authority = self.authority
        try:
            head = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {USER_AGENT}"]
            if proxy.authorization:
                head.append(f"Proxy-Authorization: {proxy.authorization}")
            transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            status = await handshake.answered
            if not 200 <= status < 300:
                reason = " (Proxy Authentication Required)" if status == 407 else ""
                raise ConnectionRefusedError(
                    f"the proxy {proxy.address} refused the tunnel to {authority}: {status}{reason}"
                )
            connection = _Connection(self)
            tls_transport = await self.loop.start_tls(transport, connection, tls, server_hostname=self.host)
        except BaseException:
            transport.close()
            raise
        assert tls_transport is not None
        connection.connection_made(tls_transport)
        return connection

    def put_idle(self, connection: _Connection) -> None:
        if len(self._idle) >= MAX_IDLE_PER_UPSTREAM:
            connection.finish()
            return
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        self._open.discard(connection)

    def close(self) -> None:
        """Close every connection (idle ones and those still serving a response)."""
        self._idle.clear()
        for connection in list(self._open):
            connection.finish()
        self._open.clear()
