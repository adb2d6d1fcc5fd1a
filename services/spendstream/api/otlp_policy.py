"""What the ingest endpoints need of the policy in force: the ``otlp:`` mapping and project teams (for
``POST /v1/traces``), its price table and its org (for every ingest: an event the processor would reject for an
unknown model, or a team-bound token naming another org, is refused at once), and the timezone reports and the
dashboard cut periods in (the policy's, as budgets are).

Read from ``spendstream.policy`` by an edge ``PolicyFollower`` started at the first ingest or report (an API that
never serves one follows nothing); until the topic has been read, the ``SPENDSTREAM_POLICY`` file, else defaults.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from spendstream.core.config import ConfigError, Settings
from spendstream.core.otlp_attribution import DEFAULT_OTLP_ATTRIBUTION, OtlpAttribution
from spendstream.core.policy import Policy, PolicyError, load_policy
from spendstream.core.pricing import PriceTable

FIRST_READ_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class OtlpView:
    attribution: OtlpAttribution = DEFAULT_OTLP_ATTRIBUTION
    project_teams: Mapping[str, str] = field(default_factory=dict)
    prices: PriceTable | None = None  # the policy's price table: ingest refuses what the processor would reject
    org: str = ""  # the policy's org: a team-bound token may not name another
    policy: Policy | None = None  # whose features' teams a team-bound token's events must belong to

    @classmethod
    def of(cls, policy: Policy) -> OtlpView:
        attribution = policy.otlp or DEFAULT_OTLP_ATTRIBUTION
        return cls(attribution, dict(policy.projects), policy.price_table, policy.org or "", policy)


class OtlpPolicy:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        try:
            self._view = OtlpView.of(load_policy(settings.policy)) if settings.policy is not None else OtlpView()
        except PolicyError as exc:
            raise ConfigError(f"SPENDSTREAM_POLICY: {exc}") from None
        self._follower: Any = None
        self._first_read: asyncio.Future[bool] | None = None

    def _adopt(self, policy: Policy) -> None:
        self._view = OtlpView.of(policy)

    async def current(self) -> OtlpView:
        if self._first_read is None:
            from spendstream.edge.policy_follower import PolicyFollower

            settings = self._settings
            self._follower = PolicyFollower(
                settings.kafka_client_config(),
                self._adopt,
                schema_registry_url=settings.schema_registry_url,
                verifier=settings.record_verifier(),
            ).start()
            self._first_read = asyncio.ensure_future(asyncio.to_thread(self._follower.wait_ready, FIRST_READ_TIMEOUT_S))
        await self._first_read
        return self._view

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()


OTLP_POLICY = web.AppKey("otlp_policy", OtlpPolicy)
