"""Pure arithmetic behind the reports: integer nano-USD in, Decimal USD only at the edge.

Every function here is free of I/O so the figures finance reads can be tested exhaustively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from spendstream.core.events import NANOS_PER_USD
from spendstream.core.periods import local_midnight, zone

# Complex-tier models (docs/architecture.md §10): what "premium-model share" counts. A model name may carry a
# provider prefix ("openai/gpt-4o") and a dated snapshot suffix ("gpt-4o-2024-08-06"); the small
# siblings (gpt-4o-mini, claude-3-5-haiku, gemini-1.5-flash) are deliberately not matched.
PREMIUM_MODEL_FAMILIES = (
    r"gpt-4o",
    r"chatgpt-4o-latest",
    r"gpt-4",
    r"gpt-4-turbo(-preview)?",
    r"gpt-4\.1",
    r"gpt-4\.5(-preview)?",
    r"gpt-5",
    r"o1(-preview|-pro)?",
    r"o3(-pro)?",
    r"claude-3-opus(-latest)?",
    r"claude-3-5-sonnet(-latest)?",
    r"claude-3-7-sonnet(-latest)?",
    r"claude-(sonnet|opus)-4(-[0-9])?",
    r"gemini-1\.5-pro(-latest)?",
    r"gemini-2\.5-pro",
)
PREMIUM_MODEL_REGEX = r"^(?:[^/]*/)?(?:" + "|".join(PREMIUM_MODEL_FAMILIES) + r")(?:-20\d\d-?\d\d-?\d\d|-\d\d\d\d)?$"
_PREMIUM = re.compile(PREMIUM_MODEL_REGEX)


def is_premium(model: str) -> bool:
    """Whether a model belongs to the complex (premium) tier."""
    return _PREMIUM.match(model) is not None


def usd(nanos: int) -> Decimal:
    """Exact USD for display or JSON (nine decimal places, never a float)."""
    return Decimal(nanos).scaleb(-9)


def usd_str(nanos: int) -> str:
    """Exact USD as a plain decimal string, e.g. ``"12.000000750"``."""
    return f"{usd(nanos):.9f}"


def ratio(part: int, whole: int) -> Decimal | None:
    """part / whole to four decimal places (e.g. 0.8125), or None when whole is 0."""
    if whole == 0:
        return None
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)


def fmt_pct(value: Decimal | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def allocate_shared(shared_nanos: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split unattributed spend across departments in proportion to their own spend.

    Largest-remainder rounding, so the shares are integers that add up to ``shared_nanos``
    exactly (ties broken by name for a stable result). With no positive weight, nothing is
    allocated: the shared spend stays visible as its own line instead of vanishing.
    """
    positive = {k: w for k, w in weights.items() if w > 0}
    total = sum(positive.values())
    if shared_nanos == 0 or total == 0:
        return dict.fromkeys(weights, 0)
    shares = {k: shared_nanos * w // total for k, w in positive.items()}
    remainder = shared_nanos - sum(shares.values())
    by_fraction = sorted(positive, key=lambda k: (-(shared_nanos * positive[k] % total), k))
    for k in by_fraction[:remainder]:
        shares[k] += 1
    return {k: shares.get(k, 0) for k in weights}


def first_of_month(day: date) -> date:
    return day.replace(day=1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def month_bounds(month: date, tz: str) -> tuple[datetime, datetime]:
    """[start, end) of a calendar month in ``tz``, as UTC instants."""
    start = first_of_month(month)
    return local_midnight(start, tz), local_midnight(next_month(start), tz)


def week_start(day: date) -> date:
    """The Monday of the ISO week containing ``day``."""
    return day - timedelta(days=day.weekday())


def local_date(instant: datetime, tz: str) -> date:
    return instant.astimezone(zone(tz)).date()


def forecast_month_end(actual_nanos: int, window_nanos: int, window_seconds: int, remaining_seconds: int) -> int:
    """Month-end spend: what is spent so far plus the recent run rate over the rest of the month.

    The run rate is the spend of a trailing window divided by the window's length; all in
    integers (floor), so the forecast is reproducible to the nano-dollar.
    """
    if window_seconds <= 0 or remaining_seconds <= 0:
        return actual_nanos
    return actual_nanos + window_nanos * remaining_seconds // window_seconds


def nanos_from_usd(value: str | int | Decimal) -> int:
    """Exact nano-USD from a USD figure given as text or Decimal ("12000", "0.000000750")."""
    amount = Decimal(str(value)) * NANOS_PER_USD
    if amount != amount.to_integral_value():
        raise ValueError(f"{value} USD is not a whole number of nano-USD")
    return int(amount)
