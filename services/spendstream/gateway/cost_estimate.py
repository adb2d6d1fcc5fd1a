"""What a request may cost before it is sent: the amount the gateway holds against a budget while it is in flight.

Held amounts are what keep concurrent requests from passing a budget together (``edge/reservation.py``), so the
estimate must not fall short of what the provider can bill: every completion a request asks for (``n``, and
``best_of``, which legacy completions generate and bill even when fewer are returned), each up to its
``max_tokens``; and a request that sets no limit holds the longest answer most models give. The prompt is billed
once whatever ``n`` is; its size is the body's, at about 4 bytes a token (JSON syntax counts too, so it errs high).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendstream.core.events import MAX_EVENT_COST_NANOS
from spendstream.core.pricing import EMPTY_TABLE, CostOverflowError, PriceTable, UnknownModelError, price_usage

# Output tokens held for each completion of a request that sets no max_tokens: the longest answer of most chat
# models (GPT-4.1 and Claude Sonnet give 32 k; a few reasoning models more). Set max_tokens to hold less.
UNBOUNDED_OUTPUT_TOKENS = 32_768
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_COMPLETIONS = ("n", "best_of")


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def output_tokens_asked(body: Mapping[str, Any]) -> int:
    """The most output tokens the request lets the provider bill: per completion, times the completions."""
    per_completion = next(
        (limit for name in _OUTPUT_LIMITS if (limit := _positive_int(body.get(name))) is not None),
        UNBOUNDED_OUTPUT_TOKENS,
    )
    completions = max([1, *(count for name in _COMPLETIONS if (count := _positive_int(body.get(name))) is not None)])
    return per_completion * completions


def request_cost_estimate(
    provider: str, model: str, body: Mapping[str, Any], body_bytes: int, prices: PriceTable = EMPTY_TABLE
) -> int:
    """The most a request should cost, in nano-USD; 0 for a model without a price (what it costs is not known
    here), the per-event ceiling for one whose estimate is beyond it (it cannot fit in any budget)."""
    try:
        return price_usage(provider, model, body_bytes // 4 + 1, output_tokens_asked(body), overrides=prices).cost_nanos
    except CostOverflowError:
        return MAX_EVENT_COST_NANOS
    except (UnknownModelError, ValueError):
        return 0
