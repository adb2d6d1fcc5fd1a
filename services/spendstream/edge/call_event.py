"""The one UsageEvent an LLM call becomes at the edge (gateway or instrumented client), priced in nano-USD."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from spendstream.core.events import MAX_EVENT_COST_NANOS, MAX_EVENT_TOKENS, UsageEvent, UsageStatus
from spendstream.core.pricing import (
    EMPTY_TABLE,
    NO_DETAIL,
    CostOverflowError,
    PriceTable,
    UnknownModelError,
    normalise_usage,
    price_usage,
    usage_detail,
)


def build_event(
    *,
    attribution: Mapping[str, str],
    provider: str,
    model_requested: str,
    model_served: str,
    raw_usage: Mapping[str, Any] | None,
    latency_ms: int,
    status: UsageStatus,
    decision: str,
    tags: dict[str, str],
    prices: PriceTable = EMPTY_TABLE,
    now: datetime | None = None,
) -> UsageEvent:
    """The usage event of one request; cost is left to the processor only when the price table rejects the model.

    Requests that reached no model (blocked, failed before an answer) cost 0. Usage beyond the per-event bounds
    (``MAX_EVENT_TOKENS`` per token field, a priced cost above ``MAX_EVENT_COST_NANOS``) is a broken upstream or
    price table: the event is still emitted, with zero tokens and the reason in ``tags["usage_error"]``.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)  # the caller's clock, if it keeps one (the demo does)
    tokens = (0, 0, 0, 0)
    detail = NO_DETAIL
    cost: int | None = 0
    source = ""
    if raw_usage:
        try:
            tokens = normalise_usage(provider, raw_usage)
            detail = usage_detail(provider, raw_usage, tokens)
            if not all(0 <= count <= MAX_EVENT_TOKENS for count in (*tokens, *detail[:7])):
                raise ValueError(f"token counts out of range (at most {MAX_EVENT_TOKENS} each): {tokens} {detail}")
        except (TypeError, ValueError) as exc:
            # A broken upstream must not cost us the event: meter it with zero tokens and say why.
            tokens, detail = (0, 0, 0, 0), NO_DETAIL
            tags = {**tags, "usage_error": str(exc)[:200]}
        input_tokens, cached, written, output_tokens = tokens
        try:
            price = price_usage(
                provider, model_served, input_tokens, output_tokens, cached, written, now, prices, detail
            )
            cost, source = price.cost_nanos, price.source
            if price.flagged_unknown:
                tags = {**tags, "price": "unknown_model"}
        except UnknownModelError:
            cost = None
        except CostOverflowError:
            cost = MAX_EVENT_COST_NANOS + 1  # beyond Int64, so beyond the ceiling: refused below
        if cost is not None and cost > MAX_EVENT_COST_NANOS:
            problem = f"priced cost {cost} nanos exceeds the per-event ceiling of {MAX_EVENT_COST_NANOS}: {tokens}"
            tokens, detail, cost, source = (0, 0, 0, 0), NO_DETAIL, 0, ""
            tags = {**tags, "usage_error": problem[:200]}
    elif status is UsageStatus.ok:
        tags = {**tags, "usage": "missing"}
        cost = None
    input_tokens, cached, written, output_tokens = tokens
    return UsageEvent(
        occurred_at=now,
        **attribution,
        tags=tags,
        provider=provider,
        model_requested=model_requested,
        model_served=model_served,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=written,
        cost_nanos=cost,
        price_source=source,
        latency_ms=latency_ms,
        status=status,
        decision_applied=decision,
        **detail._asdict(),
    )
