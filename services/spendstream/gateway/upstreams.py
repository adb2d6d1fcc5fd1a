"""Forwarding to provider upstreams with failover: the next upstream on 5xx, timeouts and connection errors."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from spendstream.gateway.config import GatewayConfig, UpstreamConfig
from spendstream.gateway.upstream_client import UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)


class UpstreamUnavailable(Exception):
    """Every upstream of a provider failed; the message says how."""


@dataclass(frozen=True)
class Target:
    provider: str
    kind: str
    base_url: str
    headers: dict[str, str]
    pool: UpstreamPool

    @classmethod
    def build(cls, provider: str, kind: str, upstream: UpstreamConfig) -> Target:
        key = upstream.api_key()
        headers: dict[str, str] = {}
        if key:
            headers = {"x-api-key": key} if kind == "anthropic" else {"Authorization": f"Bearer {key}"}
        base_url = upstream.base_url.rstrip("/")
        pool = UpstreamPool(
            base_url, connect_timeout_s=upstream.connect_timeout_s, read_timeout_s=upstream.read_timeout_s
        )
        return cls(provider, kind, base_url, headers, pool)


class Upstreams:
    """Upstream targets per provider, and counters of failures by base URL."""

    def __init__(self, config: GatewayConfig) -> None:
        self.targets = {
            name: [Target.build(name, provider.kind, upstream) for upstream in provider.upstreams]
            for name, provider in config.providers.items()
        }
        self.failures: Counter[str] = Counter()
        self.failovers = 0

    async def send(
        self, provider: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[UpstreamResponse, Target]:
        """The first answer below 500 (or the last upstream's answer); the caller releases the response."""
        targets = self.targets[provider]
        problems = []
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            if i:
                self.failovers += 1
            try:
                response = await target.pool.request(method, path, body, {**headers, **target.headers})
            except (TimeoutError, OSError) as exc:
                self.failures[target.base_url] += 1
                problems.append(f"{target.base_url}: {type(exc).__name__}: {exc}".rstrip(": "))
                log.warning("upstream %s failed: %s", target.base_url, type(exc).__name__)
                continue
            if response.status < 500 or last:
                if response.status >= 500:
                    self.failures[target.base_url] += 1
                return response, target
            self.failures[target.base_url] += 1
            log.warning("upstream %s answered %d; trying the next", target.base_url, response.status)
            response.release()
        raise UpstreamUnavailable("; ".join(problems) or f"no upstream for {provider}")

    def close(self) -> None:
        for targets in self.targets.values():
            for target in targets:
                target.pool.close()
