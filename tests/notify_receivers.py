"""Real local receivers for notifier tests and benchmarks: an aiohttp HTTP server (webhook and Slack endpoints
that accept, fail, fail then recover, or hang) and an aiosmtpd SMTP server, each on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float


@dataclass
class Endpoint:
    """``fail_first``: answer 503 to that many requests first; ``fail_always``: 500 forever; ``hang``: hold every
    request until ``release`` is set."""

    fail_first: int = 0
    fail_always: bool = False
    hang: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[Request] = field(default_factory=list)  # every request, in arrival order
    accepted: list[Request] = field(default_factory=list)  # those answered 2xx


class HttpReceiver:
    """An aiohttp server on its own thread; ``endpoint(path)`` configures and records a path."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoints: dict[str, Endpoint] = {}
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="http-receiver")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def endpoint(self, path: str, **behaviour: Any) -> Endpoint:
        self.endpoints[path] = Endpoint(**behaviour)
        return self.endpoints[path]

    async def _handle(self, request: web.Request) -> web.Response:
        endpoint = self.endpoints.get(request.path)
        if endpoint is None:
            return web.Response(status=404)
        seen = Request(request.path, dict(request.headers), await request.read(), time.monotonic())
        endpoint.requests.append(seen)
        if endpoint.hang:
            while not endpoint.release.is_set():
                await asyncio.sleep(0.05)
        if endpoint.fail_always or len(endpoint.requests) <= endpoint.fail_first:
            return web.Response(status=500 if endpoint.fail_always else 503, text="receiver unavailable")
        endpoint.accepted.append(seen)
        return web.Response(text="ok")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for endpoint in self.endpoints.values():
            endpoint.release.set()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _Collect:
    def __init__(self, mails: list[EmailMessage]) -> None:
        self.mails = mails

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = message_from_bytes(envelope.original_content, policy=email_policy.default)
        self.mails.append(mail)  # type: ignore[arg-type]
        return "250 OK"


class MailReceiver:
    """An SMTP server (aiosmtpd) that keeps every message it receives."""

    def __init__(self) -> None:
        self.mails: list[EmailMessage] = []
        self.port = free_port()
        self._controller = Controller(_Collect(self.mails), hostname="127.0.0.1", port=self.port)

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.mails if address in str(m["To"])]

    def __enter__(self) -> MailReceiver:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()
