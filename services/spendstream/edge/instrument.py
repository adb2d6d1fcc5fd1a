"""``spendstream.instrument(client, team=..., feature=...)``: enforcement and metering inside an SDK client.

For the ``openai`` and ``anthropic`` Python clients, sync and async, and the SDK of any provider dialect that
names one (``spendstream.core.providers``). Each call of ``chat.completions.create``, ``completions.create``,
``embeddings.create`` (OpenAI) or ``messages.create`` (Anthropic), the dialect's ``sdk_resources``, asks the
Enforcer first (memory only): a blocked call raises ``SpendBlocked`` without reaching the provider, a fallback
rewrites ``model``. After the call, one UsageEvent is emitted (also for blocked and failed
calls); streams are metered as they are consumed and emit when they end or are closed. Only usage numbers
are read from responses, never their text.

Clients derived later with ``with_options()`` are new objects: instrument them too.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from spendstream.core.attribution import Attribution
from spendstream.core.events import UsageStatus
from spendstream.core.providers import Dialect, dialect_for_sdk, dialects
from spendstream.edge.call_event import build_event
from spendstream.edge.enforcer import Enforcer
from spendstream.edge.verdict import Verdict

_default_lock = threading.Lock()
_default_edge: tuple[Enforcer, Any] | None = None


class SpendBlocked(Exception):
    """The Enforcer refused the call; ``verdict`` says why, ``status_code`` is what a gateway would answer."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.status_code = verdict.http_status
        where = f" for {verdict.scope}" if verdict.scope else ""
        super().__init__(f"spendstream {verdict.action}{where}: {verdict.reason}")


def default_edge() -> tuple[Enforcer, Any]:
    """The process-wide Enforcer and Emitter built from ``SPENDSTREAM_*`` settings, started on first use."""
    global _default_edge
    with _default_lock:
        if _default_edge is None:
            from spendstream.core.config import load_settings
            from spendstream.edge.emitter import Emitter

            settings = load_settings()
            _default_edge = (Enforcer(settings=settings).start(), Emitter(settings=settings))
        return _default_edge


class _SdkCall:
    """One call through an instrumented SDK client: the verdict before it, the usage seen, and the single event
    after it (the gateway's proxied request is ``gateway.app._Call``)."""

    __slots__ = ("_done", "edge", "endpoint", "model", "served", "started", "usage", "verdict")

    def __init__(self, edge: _Edge, endpoint: str, model: str) -> None:
        self.edge = edge
        self.endpoint = endpoint
        self.model = model
        self.started = time.perf_counter()
        self.verdict = edge.enforcer.check(model=model, **edge.attribution)
        self.served = self.verdict.model
        self.usage: dict[str, Any] = {}
        self._done = False

    def see(self, item: Any) -> None:
        """Record usage and served model from a response or a stream item (the SDK's dialect reads it)."""
        self.usage, self.served = self.edge.dialect.sdk_item(item, self.usage, self.served)

    def finish(self, status: UsageStatus) -> None:
        if self._done:
            return
        self._done = True
        edge = self.edge
        event = build_event(
            attribution=edge.attribution,
            provider=edge.provider,
            model_requested=self.model,
            model_served=self.served,
            raw_usage=self.usage if status is UsageStatus.ok else None,
            latency_ms=int((time.perf_counter() - self.started) * 1000),
            status=status,
            decision=self.verdict.action,
            tags={**edge.tags, "endpoint": self.endpoint},
        )
        edge.emitter.emit(event)


class _MeteredStream:
    """Wraps a provider stream: passes items through, meters them, emits once when it ends or closes."""

    def __init__(self, stream: Any, call: _SdkCall, drop_usage_chunk: bool) -> None:
        self._stream = stream
        self._call = call
        self._drop = drop_usage_chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __iter__(self) -> Any:
        status = UsageStatus.error
        try:
            for item in self._stream:
                self._call.see(item)
                if self._drop and self._call.edge.dialect.sdk_usage_only(item):
                    continue
                yield item
            status = UsageStatus.ok
        finally:
            self._call.finish(status)

    async def __aiter__(self) -> Any:
        status = UsageStatus.error
        try:
            async for item in self._stream:
                self._call.see(item)
                if self._drop and self._call.edge.dialect.sdk_usage_only(item):
                    continue
                yield item
            status = UsageStatus.ok
        finally:
            self._call.finish(status)

    def __enter__(self) -> _MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> _MeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.close()
        self._call.finish(UsageStatus.ok if self._call.usage else UsageStatus.error)

    def close(self) -> None:
        self._stream.close()
        self._call.finish(UsageStatus.ok if self._call.usage else UsageStatus.error)


class _Edge:
    def __init__(
        self, dialect: Dialect, provider: str, enforcer: Enforcer, emitter: Any, attribution: dict[str, str], tags
    ):
        self.dialect = dialect
        self.provider = provider
        self.enforcer = enforcer
        self.emitter = emitter
        self.attribution = attribution
        self.tags = tags

    def prepare(self, endpoint: str, include_usage: bool, kwargs: dict[str, Any]) -> tuple[_SdkCall, bool]:
        """Check the verdict and adapt the call's arguments; raises SpendBlocked for a blocked call."""
        call = _SdkCall(self, endpoint, str(kwargs.get("model") or ""))
        if call.verdict.blocked:
            call.finish(UsageStatus.blocked)
            raise SpendBlocked(call.verdict)
        if call.verdict.model != call.model:
            kwargs["model"] = call.verdict.model
        injected = False
        if include_usage and kwargs.get("stream") is True:
            options = kwargs.get("stream_options")
            if not isinstance(options, dict) or not options.get("include_usage"):
                kwargs["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                injected = True
        return call, injected

    def wrap_sync(self, original: Callable[..., Any], endpoint: str, include_usage: bool) -> Callable[..., Any]:
        @functools.wraps(original)
        def create(*args: Any, **kwargs: Any) -> Any:
            call, injected = self.prepare(endpoint, include_usage, kwargs)
            try:
                result = original(*args, **kwargs)
            except BaseException:
                call.finish(UsageStatus.error)
                raise
            if kwargs.get("stream") is True:
                return _MeteredStream(result, call, injected)
            call.see(result)
            call.finish(UsageStatus.ok)
            return result

        return create

    def wrap_async(self, original: Callable[..., Any], endpoint: str, include_usage: bool) -> Callable[..., Any]:
        @functools.wraps(original)
        async def create(*args: Any, **kwargs: Any) -> Any:
            call, injected = self.prepare(endpoint, include_usage, kwargs)
            try:
                result = await original(*args, **kwargs)
            except BaseException:
                call.finish(UsageStatus.error)
                raise
            if kwargs.get("stream") is True:
                return _MeteredStream(result, call, injected)
            call.see(result)
            call.finish(UsageStatus.ok)
            return result

        return create


def instrument(
    client: Any,
    *,
    team: str = "",
    project: str = "",
    feature: str = "",
    user: str = "",
    customer: str = "",
    environment: str = "",
    org: str = "",
    division: str = "",
    tags: dict[str, str] | None = None,
    provider: str | None = None,
    enforcer: Enforcer | None = None,
    emitter: Any = None,
) -> Any:
    """Instrument an ``openai`` or ``anthropic`` client in place and return it.

    Without ``enforcer``/``emitter``, a process-wide pair built from the ``SPENDSTREAM_*`` settings is used.
    ``provider`` names the provider in usage events and prices (default: ``openai`` or ``anthropic``; set it
    for OpenAI-compatible servers such as a local model).
    """
    module = type(client).__module__.split(".")[0]
    dialect = dialect_for_sdk(module)
    if dialect is None:
        supported = " and ".join(d.sdk_module for d in dialects() if d.sdk_module)
        raise TypeError(f"instrument() supports {supported} clients, not {type(client).__name__}")
    if enforcer is None or emitter is None:
        default_enforcer, default_emitter = default_edge()
        enforcer, emitter = enforcer or default_enforcer, emitter or default_emitter
    attribution = Attribution(
        org=org, division=division, team=team, project=project, feature=feature, user=user, customer=customer,
        environment=environment,
    )  # fmt: skip
    edge = _Edge(dialect, provider or module, enforcer, emitter, attribution.as_dict(), {"sdk": module, **(tags or {})})
    is_async = type(client).__name__.startswith("Async")
    for spec in dialect.sdk_resources:
        resource = client
        for name in spec.path:
            resource = getattr(resource, name)
        original = resource.create
        wrap = edge.wrap_async if is_async else edge.wrap_sync
        resource.create = wrap(original, spec.endpoint, spec.include_usage)
    return client
