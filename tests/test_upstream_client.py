"""The gateway's upstream HTTP client: response framing (pure) and pooled connections against real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.gateway.config import ConfigError, load_gateway_config
from spendstream.gateway.stub_upstream import StubUpstream
from spendstream.gateway.upstream_client import (
    MAX_HEAD_BYTES,
    ResponseParser,
    UpstreamDisconnected,
    UpstreamPool,
    UpstreamProtocolError,
)

# -- framing ---------------------------------------------------------------------------------------


def feed_all(message: bytes, cuts: list[int], eof: bool = False) -> tuple[ResponseParser, bytes]:
    parser = ResponseParser()
    body = []
    points = sorted({c % (len(message) + 1) for c in cuts})
    for start, end in zip([0, *points], [*points, len(message)], strict=True):
        body.extend(parser.feed(message[start:end]))
    if eof:
        parser.feed_eof()
    return parser, b"".join(body)


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = [], 0
    for size in sizes:
        piece = body[pos : pos + size]
        if not piece:
            break
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        pos += len(piece)
    if pos < len(body):
        out.append(b"%X\r\n%s\r\n" % (len(body) - pos, body[pos:]))
    return b"".join(out) + b"0\r\nX-Trailer: t\r\n\r\n"


bodies = st.binary(max_size=3000)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@given(bodies, cuts)
def test_content_length_body_is_reassembled_whatever_the_segmentation(body: bytes, cut: list[int]) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    parser, got = feed_all(head + body, cut)
    assert (parser.status, parser.complete, parser.keep_alive, got) == (200, True, True, body)
    assert parser.headers["content-type"] == "application/json"


@given(bodies, st.lists(st.integers(min_value=1, max_value=700), max_size=8), cuts)
def test_chunked_body_is_reassembled_whatever_the_segmentation(body: bytes, sizes: list[int], cut: list[int]) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    parser, got = feed_all(head + chunked(body, sizes), cut)
    assert (parser.complete, parser.keep_alive, got) == (True, True, body)


@given(bodies, cuts)
def test_body_without_length_runs_until_the_upstream_closes(body: bytes, cut: list[int]) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    parser, got = feed_all(head + body, cut, eof=True)
    assert (parser.complete, parser.keep_alive, got) == (True, False, body)


def test_interim_responses_are_skipped_and_bodiless_statuses_complete_at_once() -> None:
    parser, body = feed_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", [10, 30])
    assert (parser.status, parser.complete, body, parser.headers) == (204, True, b"", {"x-a": "1"})


def test_connection_close_and_http_1_0_are_not_kept_alive() -> None:
    close, _ = feed_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", [])
    old, _ = feed_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", [])
    old_keep, _ = feed_all(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", [])
    assert (close.keep_alive, old.keep_alive, old_keep.keep_alive) == (False, False, True)


def test_repeated_headers_are_joined() -> None:
    parser, _ = feed_all(b"HTTP/1.1 200 OK\r\nVia: a\r\nvia: b\r\nContent-Length: 0\r\n\r\n", [])
    assert parser.headers["via"] == "a, b"


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nok", "more body bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n", "longer than its size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP", "after the end"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD_BYTES, "head longer"),
    ],
)
def test_malformed_responses_are_refused_with_the_reason(message: bytes, why: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=why):
        feed_all(message, [])


def test_a_response_cut_short_is_a_disconnect() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(UpstreamDisconnected):
        parser.feed_eof()


# -- pooled connections against real servers ------------------------------------------------------


def test_base_urls_are_checked_when_the_config_loads(tmp_path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("providers:\n  openai:\n    upstreams: [{base_url: 'api.openai.com'}]\n")
    with pytest.raises(ConfigError, match=r"providers\.openai\.upstreams\.0\.base_url"):
        load_gateway_config(str(config))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head, await reader.readexactly(length)


def test_requests_reuse_one_connection_and_send_the_expected_head() -> None:
    async def main() -> None:
        heads: list[bytes] = []
        connections = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while True:
                try:
                    head, body = await read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
            writer.close()

        server, url = await serve(handler)
        pool = UpstreamPool(url + "/prefix/", connect_timeout_s=2, read_timeout_s=2)
        for i in range(3):
            async with await pool.request("POST", "/v1/chat/completions", b"{%d}" % i, {"Authorization": "k"}) as r:
                assert (r.status, await r.read()) == (200, b"{%d}" % i)
        pool.close()
        server.close()
        assert connections == 1
        lines = heads[0].decode().split("\r\n")
        assert lines[0] == "POST /prefix/v1/chat/completions HTTP/1.1"
        assert {"Accept-Encoding: identity", "Authorization: k", "Content-Length: 3"} <= set(lines)
        assert f"Host: 127.0.0.1:{url.rsplit(':', 1)[1]}" in lines

    asyncio.run(main())


def test_a_connection_closed_while_idle_is_replaced_without_failing_the_request() -> None:
    async def main() -> None:
        served = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal served
            await read_request(reader)
            served += 1
            # Keep-alive announced, then closed right after the response (an upstream's idle timeout).
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server, url = await serve(handler)
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=2)
        for _ in range(3):
            response = await pool.request("GET", "/v1/models", None, {})
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.05)  # the close reaches the pooled connection before it is reused
        pool.close()
        server.close()
        assert served == 3

    asyncio.run(main())


def test_a_request_racing_an_idle_close_is_sent_again_on_a_new_connection() -> None:
    async def main() -> None:
        connections = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if connections == 1:  # the next request on this connection meets its idle close: no answer
                await read_request(reader)
                writer.close()

        server, url = await serve(handler)
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=2)
        for _ in range(2):
            async with await pool.request("POST", "/v1/chat/completions", b"{}", {}) as response:
                assert await response.read() == b"ok"
        pool.close()
        server.close()
        assert connections == 2

    asyncio.run(main())


def test_silence_longer_than_the_read_timeout_fails_and_the_connection_is_not_reused() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
            await writer.drain()
            await asyncio.sleep(5)  # then nothing

        server, url = await serve(handler)
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=0.3)
        response = await pool.request("POST", "/v1/chat/completions", b"{}", {})
        chunks = response.iter_chunks()
        assert await anext(chunks) == b"ok"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await anext(chunks)
        assert 0.25 <= loop.time() - started < 2
        response.release()
        assert pool._take_idle() is None
        pool.close()
        server.close()

    asyncio.run(main())


def test_a_streamed_body_arrives_piece_by_piece() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"d\r\ndata: first\n\n\r\n")
            await writer.drain()
            await gate.wait()  # the second event is sent only once the client has the first
            writer.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
            await writer.drain()

        server, url = await serve(handler)
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=2)
        async with await pool.request("POST", "/v1/chat/completions", b"{}", {}) as response:
            assert response.headers["content-type"] == "text/event-stream"
            chunks = response.iter_chunks()
            assert await anext(chunks) == b"data: first\n\n"
            gate.set()
            assert [piece async for piece in chunks] == [b"data: second\n\n"]
        assert pool._take_idle() is not None  # read to the end: back in the pool
        pool.close()
        server.close()

    asyncio.run(main())


def test_an_upstream_that_dies_mid_body_is_a_connection_error() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()
            writer.close()

        server, url = await serve(handler)
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=2)
        response = await pool.request("POST", "/v1/chat/completions", b"{}", {})
        with pytest.raises(ConnectionError):
            await response.read()
        response.release()
        pool.close()
        server.close()

    asyncio.run(main())


def test_connection_refused_is_an_os_error_and_header_injection_is_refused() -> None:
    async def main() -> None:
        server, url = await serve(lambda reader, writer: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=2)
        with pytest.raises(OSError):
            await pool.request("GET", "/v1/models", None, {})
        with pytest.raises(ValueError, match="line break"):
            await pool.request("GET", "/v1/models", None, {"X-A": "1\r\nX-Injected: 2"})

    asyncio.run(main())


def test_the_stub_upstream_answers_through_the_pool() -> None:
    """Against a real aiohttp server: JSON and a chunked event stream, on one kept-alive connection."""

    async def main(url: str) -> None:
        pool = UpstreamPool(url, connect_timeout_s=2, read_timeout_s=5)
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi there"}]}'
        json_type = {"Content-Type": "application/json"}
        async with await pool.request("POST", "/v1/chat/completions", body, json_type) as r:
            assert r.status == 200 and b'"usage"' in await r.read()
        stream = body[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'
        async with await pool.request(
            "POST", "/v1/chat/completions", stream, {"Content-Type": "application/json"}
        ) as r:
            text = b"".join([piece async for piece in r.iter_chunks()])
        assert text.count(b"data: ") >= 3 and text.rstrip().endswith(b"data: [DONE]")
        assert len(pool._open) == 1
        pool.close()

    with StubUpstream() as stub:
        asyncio.run(main(stub.url))
