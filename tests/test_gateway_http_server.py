"""The gateway's HTTP/1.1 server over real sockets: keep-alive, pipelining, Expect: 100-continue, HTTP/1.0, head
limits, malformed requests, streamed responses and a graceful stop, with handlers of its own (no gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from spendstream.gateway.app import new_event_loop
from spendstream.gateway.http_server import MAX_HEAD_BYTES, BodyTooLarge, HttpServer, Request, Response


class Running:
    """An ``HttpServer`` on its own loop in a thread, with an echo, a slow and a streaming handler."""

    def __init__(self, head_timeout_s: float = 1.0) -> None:
        self.loop = new_event_loop()
        self.release = asyncio.Event()
        self.seen: list[str] = []

        async def echo(request: Request) -> Response:
            try:
                body = await request.read(1000, 1.0)
            except BodyTooLarge:
                return Response(413, b"too large")
            except TimeoutError:
                return Response(408, b"too slow")
            self.seen.append(request.path)
            return Response(200, b"%s %s %s" % (request.method.encode(), request.path.encode(), body))

        async def slow(request: Request) -> Response:
            await self.release.wait()
            return Response(200, b"finally")

        async def stream(request: Request) -> Response:
            out = request.stream(200, {"Content-Type": "text/event-stream"})
            await out.prepare()
            for i in range(3):
                await out.write(b"data: %d\n\n" % i)
            await out.write_eof()
            return out  # type: ignore[return-value]

        async def endless(request: Request) -> Response:
            out = request.stream(200, {"Content-Type": "text/event-stream"})
            await out.prepare()
            try:
                await out.write(b"data: first\n\n")
                await asyncio.sleep(60)
            finally:
                self.seen.append("endless cleaned up")
            return out  # type: ignore[return-value]

        async def refuse(request: Request) -> Response:  # answers without reading the body (as a 401 does)
            return Response(401, b"who are you")

        async def missing(request: Request) -> Response:
            return Response(404, b"no " + request.path.encode())

        routes = {
            ("POST", "/echo"): echo,
            ("GET", "/echo"): echo,
            ("GET", "/slow"): slow,
            ("GET", "/stream"): stream,
            ("GET", "/endless"): endless,
            ("POST", "/refuse"): refuse,
        }
        self.server = HttpServer(routes, head_timeout_s=head_timeout_s, max_body_bytes=1000, not_found=missing)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.port = self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.release.set)
        self.call(self.server.shutdown(5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[Running]:
    running = Running()
    yield running
    running.stop()


def connect(server: Running) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split whole (Content-Length) responses: (status, headers, body) each."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def test_keep_alive_and_pipelined_requests_are_answered_in_order(server: Running) -> None:
    with connect(server) as sock:
        requests = (
            b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n%03d" % i for i in range(40))
            + b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(requests)
        answers = responses(read_all(sock))
    assert [body for _, _, body in answers] == [b"POST /echo %03d" % i for i in range(40)] + [b"GET /echo "]
    assert answers[0][1]["server"] == "spendstream" and "date" in answers[0][1]
    assert answers[-1][1]["connection"] == "close"


def test_expect_100_continue_is_answered_before_the_body_is_sent(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        ((status, _, body),) = responses(read_all(sock))
    assert (status, body) == (200, b"POST /echo hello")


def test_chunked_bodies_and_limits(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert responses(read_all(sock))[0][2] == b"POST /echo abcde"
    with connect(server) as sock:  # beyond the limit and still arriving: 413, and the connection closes
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 2000)
        ((status, headers, _),) = responses(read_all(sock))
    assert status == 413 and headers["connection"] == "close"
    with connect(server) as sock:  # beyond the limit but whole: the connection can carry the next request
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        sock.sendall(head + b"x" * 5000 + b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert [status for status, _, _ in responses(read_all(sock))] == [413, 200]
    with connect(server) as sock:  # a body that stops arriving
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nxx")
        ((status, _, _),) = responses(read_all(sock))
    assert status == 408


def test_http_1_0_closes_unless_keep_alive_is_asked_for(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        ((status, headers, _),) = responses(read_all(sock))  # read_all: the server closed it
    assert status == 200 and headers["connection"] == "close"
    with connect(server) as sock:
        sock.sendall(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        time.sleep(0.2)
        first = sock.recv(65536)
        assert b"Connection: keep-alive" in first
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        assert len(responses(first + read_all(sock))) == 2


def test_head_gets_the_headers_of_get_without_the_body(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 11\r\n" in data and data.endswith(b"\r\n\r\n")


def test_a_refused_request_gets_no_100_continue_and_its_body_need_not_be_sent(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        ((status, headers, body),) = responses(read_all(sock))
    assert (status, body) == (401, b"who are you") and headers["connection"] == "close"


def test_an_upgrade_offer_is_declined_and_its_body_still_read(server: Running) -> None:
    """As `curl --http2` sends a POST on a cleartext connection: answered in HTTP/1.1, with the body."""
    offer = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    for framing, body in (
        (b"Content-Length: 5\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ):
        for split in (False, True):  # the body in the read of the head, or after it
            with connect(server) as sock:
                head = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + offer + framing + b"\r\n"
                if split:
                    sock.sendall(head)
                    time.sleep(0.1)
                    sock.sendall(body)
                else:
                    sock.sendall(head + body)
                ((status, _, answer),) = responses(read_all(sock))
            assert (status, answer) == (200, b"POST /echo hello"), (framing, split)
    with connect(server) as sock:  # without a body
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n" + offer + b"\r\n")
        ((status, _, answer),) = responses(read_all(sock))
    assert (status, answer) == (200, b"GET /echo ")


def refused(server: Running, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        ((status, headers, body),) = responses(read_all(sock))
    return status, headers, body


def test_heads_that_cannot_be_served_get_a_status_that_says_why(server: Running) -> None:
    big = b"X-Big: " + b"y" * (MAX_HEAD_BYTES + 10) + b"\r\n"  # in one read: the head completes in it
    status, headers, body = refused(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert status == 431 and b"request_head_too_large" in body and headers["server"] == "spendstream"
    status, _, body = refused(server, b"GET /echo HTTP/1.1\r\n\r\n")
    assert status == 400 and b"Host header" in body
    status, _, body = refused(server, b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status == 400 and b"one Host header" in body
    status, _, body = refused(server, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    assert status == 405 and b"CONNECT" in body
    status, _, body = refused(server, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert status == 505 and b"HTTP/1.1" in body


def test_a_body_that_cannot_be_framed_gets_400(server: Running) -> None:
    status, headers, body = refused(
        server, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    )
    assert status == 400 and headers["connection"] == "close" and b"cannot be framed" in body


def test_malformed_and_oversized_heads_are_refused_and_closed(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nBad Header Line\r\n\r\n")
        ((status, _, body),) = responses(read_all(sock))
    assert status == 400 and b"malformed HTTP request" in body and b'"code": "malformed_request"' in body
    with connect(server) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(MAX_HEAD_BYTES // 1000 + 2):
                sock.sendall(b"X-Filler: " + b"y" * 990 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_all(sock)  # the answer arrives although the client was still sending (no reset)
    assert data.startswith(b"HTTP/1.1 431") and b"larger than" in data


def test_an_idle_connection_is_closed_after_the_head_timeout(server: Running) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, with nothing sent
    assert 0.9 <= time.monotonic() - started < 5


def test_unknown_paths_go_to_the_not_found_handler(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ((status, _, body),) = responses(read_all(sock))
    assert (status, body) == (404, b"no /nowhere")
    assert server.server.methods_of("/echo") == ["GET", "POST"] and server.server.methods_of("/nowhere") == []


def test_a_streamed_response_is_chunked(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n")) + (
        b"0\r\n\r\n"
    )


def test_shutdown_lets_a_request_in_flight_finish_and_closes_idle_connections() -> None:
    running = Running(head_timeout_s=30)
    idle, busy = connect(running), connect(running)
    busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    stopping = asyncio.run_coroutine_threadsafe(running.server.shutdown(10), running.loop)
    time.sleep(0.3)
    assert idle.recv(1) == b""  # closed at once
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=1).close()  # no longer listening
    assert not stopping.done()  # waiting for the request in flight
    running.loop.call_soon_threadsafe(running.release.set)
    ((status, headers, body),) = responses(read_all(busy))  # answered, then closed
    stopping.result(10)
    assert (status, body) == (200, b"finally") and headers["connection"] == "close"
    idle.close()
    busy.close()
    running.stop()


def test_a_stream_that_outlives_the_grace_period_is_cancelled_and_cleans_up() -> None:
    running = Running(head_timeout_s=30)
    sock = connect(running)
    sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    started = time.monotonic()
    running.call(running.server.shutdown(0.5))
    assert time.monotonic() - started < 3
    data = read_all(sock)  # what was streamed, then the connection ends without the terminating chunk
    assert b"data: first" in data and not data.endswith(b"0\r\n\r\n")
    assert "endless cleaned up" in running.seen
    sock.close()
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(10)
