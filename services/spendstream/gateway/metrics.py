"""The gateway's metrics read at scrape time: request outcomes, decisions applied, upstream failures, the
Enforcer's staleness."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spendstream.core.metrics import Family, Reading, register_collector

if TYPE_CHECKING:
    from spendstream.gateway.app import Gateway


def _gateway_reading(gateway: Gateway) -> Reading:
    enforcer = gateway.enforcer
    return {
        "spendstream_gateway_requests": {(outcome,): n for outcome, n in gateway.counts.items()},
        "spendstream_gateway_decisions": {(action,): n for action, n in gateway.decisions.items()},
        "spendstream_gateway_upstream_failures": {(url,): n for url, n in gateway.upstreams.failures.items()},
        "spendstream_gateway_upstream_failovers": gateway.upstreams.failovers,
        "spendstream_enforcer_staleness_seconds": enforcer.staleness_s if enforcer is not None else float("inf"),
    }


GATEWAYS = register_collector(
    [
        Family(
            "spendstream_gateway_requests",
            "Proxied requests by outcome: ok, error (upstream answered >= 400), a blocking action, cache_hit, "
            "bad_request, unauthorized, upstream_unavailable; unmetered pass-throughs: model_list, token_count, "
            "stored_response",
            "counter",
            ("outcome",),
        ),
        Family(
            "spendstream_gateway_decisions",
            "Enforcer verdicts applied by the gateway to proxied requests, by action (allow, alert, fallback, "
            "throttle, shutoff, deny_model, unavailable).",
            "counter",
            ("action",),
        ),
        Family(
            "spendstream_gateway_upstream_failures",
            "Upstream calls that failed (5xx, timeout, connection error), by upstream base URL.",
            "counter",
            ("upstream",),
        ),
        Family("spendstream_gateway_upstream_failovers", "Requests retried on the next upstream.", "counter"),
        Family(
            "spendstream_enforcer_staleness_seconds",
            "Seconds since the gateway's Enforcer view was last complete (+Inf before the first time).",
            "gauge",
        ),
    ],
    _gateway_reading,
)
