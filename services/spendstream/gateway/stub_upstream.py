"""A stub OpenAI- and Anthropic-compatible LLM server for tests, benchmarks and the demo.

Deterministic: input tokens = words in the prompt, output tokens = ``max_tokens`` (default 8, at most 256)
words of filler for each of the ``n`` completions asked for (legacy completions: ``best_of``), all billed as OpenAI
bills them. Streams honour ``stream_options.include_usage`` the way OpenAI does. Faults are injected
with ``fail_status`` (answer every request with that status), ``hang_s`` (sleep before answering) or
``cut_stream_after`` (a stream stops after that many text chunks: the connection drops, after ``stall_stream_s`` of
silence when that is set); ``reported_usage`` replaces the chat usage block, and ``omit_usage`` leaves it out, streamed
or not (a broken upstream); ``answers_as`` names the model chat answers report (a deployment name's model).

Run standalone: ``python -m spendstream.gateway.stub_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Any

from aiohttp import web

from spendstream.core.arg_types import whole_number

DEFAULT_OUTPUT_TOKENS = 8


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items() if k in ("content", "text", "input", "prompt", "system"))
    return 0


def _output_tokens(body: dict[str, Any]) -> int:
    wanted = (
        body.get("max_tokens")
        or body.get("max_completion_tokens")
        or body.get("max_output_tokens")
        or DEFAULT_OUTPUT_TOKENS
    )
    return max(1, min(int(wanted), 256))


def _choices(body: dict[str, Any]) -> int:
    """Completions asked for (``n``; legacy completions bill ``best_of``): each is billed, as OpenAI bills them."""
    asked = [value for name in ("n", "best_of") if isinstance(value := body.get(name), int) and value > 0]
    return min(max([1, *asked]), 128)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class StubUpstream:
    """The stub server in a background thread of its own (usable from sync tests and scripts)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.fail_status: int | None = None
        self.hang_s = 0.0
        self.cut_stream_after: int | None = None
        self.stall_stream_s = 0.0
        self.reported_usage: dict[str, Any] | None = None
        self.omit_usage = False
        self.answers_as: str | None = None  # the model chat answers name (an Azure deployment answers as its model)
        self.requests = 0
        self.last_body: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        self.last_query = ""
        self.stored: dict[str, dict[str, Any]] = {}  # Responses API responses it made, by id (the last thousand)
        self.response_headers: dict[str, str] = {}  # sent with every chat answer (e.g. rate-limit headers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # providers take long prompts; so does the stub
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/responses/input_tokens", self._input_tokens)
        app.router.add_get("/v1/responses/{id}", self._stored)
        app.router.add_delete("/v1/responses/{id}", self._stored)
        app.router.add_get("/v1/responses/{id}/input_items", self._input_items)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel)
        app.router.add_get("/v1/models", self._models)
        return app

    # -- lifecycle -------------------------------------------------------------------------------
    async def start_async(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> StubUpstream:
        """Serve from a thread of its own; raises what binding the port raised (``OSError``: the port is taken)."""
        started = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.start_async())
            except BaseException as exc:
                failed.append(exc)
                self._loop.close()
                self._loop = None
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop_async())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="stub-upstream", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("stub upstream did not start")
        if failed:
            self._thread.join(10)
            self._thread = None
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> StubUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers --------------------------------------------------------------------------------
    async def _accept(self, request: web.Request) -> dict[str, Any] | web.Response:
        self.requests += 1
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.fail_status is not None:
            return web.json_response(
                {"error": {"message": "stub failure", "type": "server_error"}},
                status=self.fail_status,
                headers=self.response_headers,
            )
        body = await request.json()
        self.last_body = body
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                error = {"message": f"invalid '{name}': expected an integer >= 1", "type": "invalid_request_error"}
                return web.json_response({"error": error}, status=400)
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        model, n_in, per_choice = (
            self.answers_as or body["model"],
            _words(body.get("messages", [])),
            _output_tokens(body),
        )
        choices, n_out = _choices(body), per_choice * _choices(body)
        usage = {
            "prompt_tokens": n_in,
            "completion_tokens": n_out,
            "total_tokens": n_in + n_out,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        usage = self.reported_usage or usage
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(["word"] * per_choice)}
            answers = [
                {"index": i, "message": message, "finish_reason": "stop", "logprobs": None} for i in range(choices)
            ]
            answer = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": answers}
            if not self.omit_usage:
                answer["usage"] = usage
            return web.json_response(answer, headers=self.response_headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        for i in range(per_choice):
            delta = {"role": "assistant", "content": "word"} if i == 0 else {"content": " word"}
            await self._maybe_cut(request, i)
            await response.write(_sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        await response.write(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage") and not self.omit_usage:
            await response.write(_sse({**base, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        n_in, per_choice = _words(body.get("prompt", "")), _output_tokens(body)
        n_out = per_choice * _choices(body)
        choice = {"index": 0, "text": " ".join(["word"] * per_choice), "finish_reason": "stop", "logprobs": None}
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex[:12]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            }
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("input", "")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        n_in = _words(inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.0] * 8} for i in range(len(inputs))]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": n_in, "total_tokens": n_in},
            }
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        model = body["model"]
        n_in = _words(body.get("messages", [])) + _words(body.get("system", ""))
        n_out = _output_tokens(body)
        usage = {
            "input_tokens": n_in,
            "output_tokens": n_out,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        }
        message = {
            "id": f"msg_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        if not body.get("stream"):
            text = {"type": "text", "text": " ".join(["word"] * n_out)}
            return web.json_response({**message, "content": [text], "stop_reason": "end_turn", "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse({"type": "message_start", "message": message}, "message_start"))
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        await response.write(_sse(block, "content_block_start"))
        for i in range(n_out):
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " word" if i else "word"},
            }
            await self._maybe_cut(request, i)
            await response.write(_sse(delta, "content_block_delta"))
        await response.write(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": n_out},
        }
        await response.write(_sse(end, "message_delta"))
        await response.write(_sse({"type": "message_stop"}, "message_stop"))
        await response.write_eof()
        return response

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: ``input`` (a string or messages) and ``max_output_tokens``; a stream of typed events
        whose ``response.completed`` carries the whole response with its usage."""
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        n_in = _words(body.get("input", "")) + _words(body.get("instructions", ""))
        n_out = _output_tokens(body)
        usage = {
            "input_tokens": n_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out,
        }
        rid, item_id = f"resp_{uuid.uuid4().hex[:12]}", f"msg_{uuid.uuid4().hex[:12]}"
        text = " ".join(["word"] * n_out)
        content = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [content]}
        done = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body["model"],
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": self.reported_usage or usage,
        }
        self.stored[rid] = done
        while len(self.stored) > 1000:
            del self.stored[next(iter(self.stored))]
        if not body.get("stream"):
            return web.json_response(done, headers=self.response_headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        seq = iter(range(1 << 30))
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        async def send(kind: str, **fields: Any) -> None:
            await response.write(_sse({"type": kind, "sequence_number": next(seq), **fields}, kind))

        await send("response.created", response=started)
        await send("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
        await send("response.content_part.added", **where, part={**content, "text": ""})
        for i in range(n_out):
            await self._maybe_cut(request, i)
            await send("response.output_text.delta", **where, delta=" word" if i else "word", logprobs=[])
        await send("response.output_text.done", **where, text=text, logprobs=[])
        await send("response.content_part.done", **where, part=content)
        await send("response.output_item.done", output_index=0, item=item)
        await send("response.completed", response=done)
        await response.write_eof()
        return response

    async def _stored(self, request: web.Request) -> web.StreamResponse:
        """A response it made (the last thousand), retrieved or deleted."""
        self.requests += 1
        rid = request.match_info["id"]
        found = self.stored.get(rid)
        if found is None:
            error = {"message": f"No response found with id '{rid}'.", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=404)
        if request.method == "DELETE":
            del self.stored[rid]
            return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})
        return web.json_response(found)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        """Only a background response can be cancelled, and this stub makes none (the gateway refuses them)."""
        self.requests += 1
        error = {
            "message": "Only responses created with background=true can be cancelled.",
            "type": "invalid_request_error",
        }
        return web.json_response({"error": error}, status=400)

    async def _input_items(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.last_query = request.query_string
        return web.json_response({"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False})

    async def _input_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        n_in = _words(body.get("input", "")) + _words(body.get("instructions", ""))
        return web.json_response({"object": "response.input_tokens", "input_tokens": n_in})

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response({"input_tokens": _words(body.get("messages", [])) + _words(body.get("system", ""))})

    async def _maybe_cut(self, request: web.Request, chunks_sent: int) -> None:
        """The injected mid-stream fault: silence, then a dropped connection (no terminating chunk)."""
        if self.cut_stream_after is None or chunks_sent < self.cut_stream_after:
            return
        if self.stall_stream_s:
            await asyncio.sleep(self.stall_stream_s)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # ends the handler without a response of its own

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        names = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
        return web.json_response(
            {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "stub"} for n in names]}
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="stub OpenAI/Anthropic-compatible LLM server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=whole_number(0, 65535), default=9000)
    args = parser.parse_args()
    stub = StubUpstream(args.host, args.port)
    web.run_app(stub.app(), host=args.host, port=args.port, access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()
