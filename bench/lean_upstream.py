"""A lean stand-in for an LLM provider in benchmarks: OpenAI-style chat completions, plain and streamed.

A real provider costs the gateway's machine nothing; the stub upstream of ``spendstream.gateway.stub_upstream``
(an aiohttp application) costs about 0.13 ms of CPU per request here, which on 2 cores is taken from the gateway
being measured. This one frames requests with ``httptools`` (llhttp) on a bare asyncio protocol and answers what
the product's stub answers for a chat completion (input tokens = words of the messages, output tokens =
``max_tokens`` words; the usage chunk of a stream when ``stream_options.include_usage`` asks for it).

Run: python bench/lean_upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httptools

MODELS = json.dumps({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}).encode()


def _words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            count += len(content.split())
    return count


def _head(status: int, content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    return f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, body = self._url, b"".join(self._body)
        self._url, self._body = b"", []
        assert self.transport is not None
        if url.endswith(b"/models"):
            self.transport.write(_head(200, "application/json", len(MODELS)) + MODELS)
        elif url.endswith(b"/chat/completions"):
            self._chat(json.loads(body))
        else:
            self.transport.write(_head(404, "application/json", 2) + b"{}")

    def _chat(self, request: dict[str, Any]) -> None:
        assert self.transport is not None
        n_in = _words(request.get("messages"))
        n_out = max(1, min(int(request.get("max_tokens") or 8), 256))
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        base = {"id": "chatcmpl-bench", "created": int(time.time()), "model": request.get("model", "")}
        if not request.get("stream"):
            message = {"role": "assistant", "content": " ".join(["word"] * n_out)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            answer = json.dumps({**base, "object": "chat.completion", "choices": [choice], "usage": usage}).encode()
            self.transport.write(_head(200, "application/json", len(answer)) + answer)
            return
        write = self.transport.write
        write(_head(200, "text/event-stream", None))
        base["object"] = "chat.completion.chunk"
        for i in range(n_out):
            delta = {"role": "assistant", "content": "word"} if i == 0 else {"content": " word"}
            event = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
        stop = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        write(_chunk(b"data: " + json.dumps(stop).encode() + b"\n\n"))
        if (request.get("stream_options") or {}).get("include_usage"):
            write(_chunk(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"))
        write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Connection, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
