"""Dollar amounts written for people (decision reasons, policy summaries, console lines, notifications).

Totals stay integer nano-USD everywhere; this only writes one. ``usd_text``: whole cents and amounts of a dollar or
more read as ``$1,234.57``; below a dollar, an amount that is not whole cents keeps four significant digits
(``$0.001689``), so a small budget or spend never reads as ``$0.00``. ``exact_usd_text``: every nano-dollar, for
figures that are compared (a ceiling and what would pass it) or reconciled.
"""

from __future__ import annotations

from decimal import Decimal

from spendstream.core.events import NANOS_PER_USD

_CENT = Decimal("0.01")


def usd_text(nanos: int) -> str:
    amount = Decimal(abs(nanos)) / NANOS_PER_USD
    sign = "-" if nanos < 0 else ""
    if amount >= 1 or amount == amount.quantize(_CENT):
        return f"{sign}${amount:,.2f}"
    places = min(9, 3 - amount.adjusted())  # four significant digits, at most down to the nano-dollar
    whole, _, fraction = f"{amount.quantize(Decimal(1).scaleb(-places)):f}".partition(".")
    return f"{sign}${whole}.{fraction.rstrip('0').ljust(2, '0')}"


def exact_usd_text(nanos: int | None) -> str:
    """``$6,400.00``, ``$0.000000750``, ``-$1.50``, ``$5,000.000000001``; ``-`` for None."""
    if nanos is None:
        return "-"
    amount = Decimal(abs(nanos)) / NANOS_PER_USD
    sign = "-" if nanos < 0 else ""
    if amount == amount.quantize(_CENT):
        return f"{sign}${amount:,.2f}"
    return f"{sign}${amount.normalize():,f}"
