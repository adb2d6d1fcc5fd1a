"""Price one LLM call in integer nano-USD.

API (shared by the gateway, which prices requests, and the processor, which prices events that lack a cost):

- ``normalise_usage(provider, raw_usage) -> NormalisedUsage(input_tokens, cached_read, cache_write, output_tokens)``
  turns a provider's usage block into spendstream's convention: ``input_tokens`` INCLUDES cached reads and
  cache writes (as in ``UsageEvent`` and genai-prices' ``Usage``), so nothing is billed twice or for free.
- ``price_usage(provider, model, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, at,
  overrides) -> PriceResult(cost_nanos, source, flagged_unknown)``.
- ``PriceTable``: the user's override rows (negotiated rates, self-hosted models priced by GPU time), what to do
  with an unknown model (``"default_price"``: price it at ``default_price`` and flag it, or ``"reject"``: raise
  ``UnknownModelError`` so the caller sends the event to the DLQ), and a content ``version``.

Rounding: the exact Decimal cost is converted to nano-USD with ROUND_HALF_EVEN (unbiased, so the rounding error
of millions of events sums to about zero instead of drifting one way), with one exception: a call whose exact
cost is positive is never recorded below 1 nano, so a paid call never looks free. A 10-token call at
$0.075/M is exactly 750 nanos; no rounding happens at all for prices with at most 3 decimals per million tokens.

Speed: genai-prices costs ~70 us per lookup, so the per-token rates of a (provider, model, price version,
minute) are resolved once and memoised; pricing a call is then a few Decimal multiplications.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, NamedTuple

from genai_prices import Usage, calc_price

from spendstream.core.providers import NormalisedUsage, dialect_for

NANOS_PER_USD = 1_000_000_000
_NANOS_PER_TOKEN_PER_USD_PER_MTOK = Decimal(NANOS_PER_USD) / Decimal(1_000_000)  # = 1000
_MTOK = 1_000_000


class UnknownModelError(LookupError):
    """No price for this model and the price table says to reject it (the caller sends the event to the DLQ)."""


INT64_MAX = 2**63 - 1  # the ledger's cost_nanos column is Int64


class CostOverflowError(ValueError):
    """The priced cost does not fit the ledger's Int64 nano-USD (absurd token counts): the caller dead-letters it."""


class PriceResult(NamedTuple):
    cost_nanos: int
    source: str  # "override:<provider>/<model>", "genai-prices:<provider>/<model id>" or "default"
    flagged_unknown: bool


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens, as Decimals (never floats). ``None`` cache rates fall back to the input rate."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """One row of the user's price table; it wins over genai-prices while ``effective_from <= at < effective_to``."""

    provider: str
    model: str
    rates: Rates
    effective_from: datetime | None = None
    effective_to: datetime | None = None

    def effective_at(self, at: datetime) -> bool:
        return (self.effective_from is None or self.effective_from <= at) and (
            self.effective_to is None or at < self.effective_to
        )


# Conservative premium-model rates: an unknown model is over- rather than under-estimated.
DEFAULT_UNKNOWN_RATES = Rates(input_per_mtok=Decimal("15"), output_per_mtok=Decimal("75"))


@dataclass(frozen=True, eq=False)
class PriceTable:
    """Overrides plus the unknown-model setting; ``version`` (content hash) keys the memo cache."""

    overrides: tuple[PriceOverride, ...] = ()
    unknown_model: Literal["default_price", "reject"] = "default_price"
    default_price: Rates = DEFAULT_UNKNOWN_RATES
    version: str = field(init=False)
    _by_model: dict[tuple[str, str], tuple[PriceOverride, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_model: dict[tuple[str, str], list[PriceOverride]] = {}
        for row in self.overrides:
            by_model.setdefault((row.provider.lower(), row.model.lower()), []).append(row)
        # Latest effective_from first, so overlapping rows resolve to the newest negotiated rate.
        ordered = {
            key: tuple(sorted(rows, key=lambda r: r.effective_from or datetime.min.replace(tzinfo=UTC), reverse=True))
            for key, rows in by_model.items()
        }
        object.__setattr__(self, "_by_model", ordered)
        object.__setattr__(self, "version", _table_hash(self))

    def override_for(self, provider: str, model: str, at: datetime) -> PriceOverride | None:
        for row in self._by_model.get((provider.lower(), model.lower()), ()):
            if row.effective_at(at):
                return row
        return None


def _table_hash(table: PriceTable) -> str:
    def rates(r: Rates) -> list[str | None]:
        return [
            str(v) if v is not None else None
            for v in (r.input_per_mtok, r.output_per_mtok, r.cache_read_per_mtok, r.cache_write_per_mtok)
        ]

    doc = {
        "unknown_model": table.unknown_model,
        "default": rates(table.default_price),
        "rows": [
            [o.provider, o.model, rates(o.rates), str(o.effective_from), str(o.effective_to)] for o in table.overrides
        ],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


EMPTY_TABLE = PriceTable()


# -- usage normalisation ------------------------------------------------------------------------------------


def normalise_usage(provider: str, raw_usage: Mapping[str, Any]) -> NormalisedUsage:
    """Map a provider's usage block to (input incl. cached, cached_read, cache_write, output).

    The provider's dialect (``spendstream.core.providers``) knows its block: OpenAI counts cached reads inside
    the prompt, Anthropic outside it, Gemini bills thinking tokens as output.
    """
    return dialect_for(provider).usage(raw_usage)


# -- pricing -------------------------------------------------------------------------------------------------


class _Linear(NamedTuple):
    """Nano-USD per token for each token class plus a per-call constant (all exact Decimals)."""

    per_call: Decimal
    uncached: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal
    source: str
    flagged: bool
    # The same five as ints when every one is a whole number of nanos (most list prices: $0.15/M is 150 nanos a
    # token), so a call is priced exactly in integer arithmetic, without Decimal or rounding.
    whole: tuple[int, int, int, int, int] | None


def _linear(
    per_call: Decimal, uncached: Decimal, read: Decimal, write: Decimal, output: Decimal, source: str, flagged: bool
) -> _Linear:
    rates = (per_call, uncached, read, write, output)
    whole = tuple(int(r) for r in rates) if all(r == r.to_integral_value() for r in rates) else None
    return _Linear(per_call, uncached, read, write, output, source, flagged, whole)  # type: ignore[arg-type]


def _linear_from_rates(rates: Rates, source: str, flagged: bool) -> _Linear:
    k = _NANOS_PER_TOKEN_PER_USD_PER_MTOK
    read = rates.cache_read_per_mtok if rates.cache_read_per_mtok is not None else rates.input_per_mtok
    write = rates.cache_write_per_mtok if rates.cache_write_per_mtok is not None else rates.input_per_mtok
    return _linear(
        Decimal(0), rates.input_per_mtok * k, read * k, write * k, rates.output_per_mtok * k, source, flagged
    )


def _usd_to_nanos_exact(usd: Decimal) -> Decimal:
    return usd * NANOS_PER_USD


def _genai_rates(provider: str, model: str, at: datetime) -> _Linear | Any | None:
    """Linear per-token rates from genai-prices, or the ModelPrice itself when its prices are tiered."""
    try:
        calc = calc_price(
            Usage(input_tokens=0, output_tokens=0), model, provider_id=provider, genai_request_timestamp=at
        )
    except LookupError:
        return None
    mp = calc.model_price
    source = f"genai-prices:{calc.provider.id}/{calc.model.id}"
    token_prices = [
        getattr(mp, name, None) for name in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    ]
    if any(v is not None and not isinstance(v, Decimal) for v in token_prices):
        return (mp, source)  # tiered: priced per call by genai-prices itself

    def total(**tokens: int) -> Decimal:
        return _usd_to_nanos_exact(mp.calc_price(Usage(**tokens))["total_price"])

    base = total(input_tokens=0, output_tokens=0)
    uncached = (total(input_tokens=_MTOK) - base) / _MTOK
    read = (total(input_tokens=_MTOK, cache_read_tokens=_MTOK) - base) / _MTOK
    write = (total(input_tokens=_MTOK, cache_write_tokens=_MTOK) - base) / _MTOK
    output = (total(input_tokens=0, output_tokens=_MTOK) - base) / _MTOK
    return _linear(base, uncached, read, write, output, source, False)


_MEMO: dict[tuple[str, str, int, str], _Linear | tuple[Any, str]] = {}
_MEMO_MAX = 65_536


def _resolve(provider: str, model: str, minute: datetime, table: PriceTable) -> _Linear | tuple[Any, str]:
    row = table.override_for(provider, model, minute)
    if row is not None:
        return _linear_from_rates(row.rates, f"override:{row.provider}/{row.model}", False)
    found = _genai_rates(provider, model, minute)
    if found is not None:
        return found
    if table.unknown_model == "reject":
        raise UnknownModelError(f"no price for provider={provider!r} model={model!r} and unknown_model=reject")
    return _linear_from_rates(table.default_price, "default", True)


def to_nanos(exact_nanos: Decimal) -> int:
    """Round an exact nano-USD amount half-even, but never a positive amount down to zero."""
    nanos = int(exact_nanos.to_integral_value(rounding=ROUND_HALF_EVEN))
    if nanos == 0 and exact_nanos > 0:
        return 1
    return nanos


def usd_to_nanos(usd: Decimal | int | str) -> int:
    """Exact conversion of a human USD amount (``"8000"``, ``Decimal("0.01")``) to integer nanos."""
    return to_nanos(Decimal(usd) * NANOS_PER_USD)


def price_usage(
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    at: datetime | None = None,
    overrides: PriceTable = EMPTY_TABLE,
) -> PriceResult:
    """Cost of one call. ``input_tokens`` includes ``cached_input_tokens`` and ``cache_write_tokens``.

    Raises ``UnknownModelError`` only when the table says ``unknown_model: reject``; otherwise an unknown model
    is priced at the table's default rates and flagged, never at $0. Raises ``CostOverflowError`` when the cost
    exceeds Int64 nano-USD (what the ledger and every total can hold).
    """
    if min(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens) < 0:
        raise ValueError("token counts must not be negative")
    uncached = input_tokens - cached_input_tokens - cache_write_tokens
    if uncached < 0:
        raise ValueError(
            f"cached_input_tokens ({cached_input_tokens}) + cache_write_tokens ({cache_write_tokens}) "
            f"exceed input_tokens ({input_tokens})"
        )
    # Memoised per (provider, model, minute, table version); the minute covers genai-prices' time-of-day prices.
    # The key holds the minute as a number: building the datetime costs more than the rest of a memoised call.
    at = at or datetime.now(UTC)
    key = (provider, model, int(at.timestamp() // 60), overrides.version)
    resolved = _MEMO.get(key)
    if resolved is None:
        resolved = _resolve(provider, model, at.replace(second=0, microsecond=0), overrides)
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = resolved
    if isinstance(resolved, _Linear):
        if resolved.whole is not None:
            per_call, per_uncached, per_read, per_write, per_output = resolved.whole
            cost = (
                per_call
                + uncached * per_uncached
                + cached_input_tokens * per_read
                + cache_write_tokens * per_write
                + output_tokens * per_output
            )
            return PriceResult(_bounded(cost, provider, model), resolved.source, resolved.flagged)
        exact = (
            resolved.per_call
            + uncached * resolved.uncached
            + cached_input_tokens * resolved.cache_read
            + cache_write_tokens * resolved.cache_write
            + output_tokens * resolved.output
        )
        return PriceResult(_bounded(to_nanos(exact), provider, model), resolved.source, resolved.flagged)
    model_price, source = resolved
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cached_input_tokens,
        cache_write_tokens=cache_write_tokens,
    )
    cost = to_nanos(_usd_to_nanos_exact(model_price.calc_price(usage)["total_price"]))
    return PriceResult(_bounded(cost, provider, model), source, False)


def _bounded(cost_nanos: int, provider: str, model: str) -> int:
    if cost_nanos > INT64_MAX:
        raise CostOverflowError(
            f"cost of {cost_nanos} nano-USD for provider={provider!r} model={model!r} exceeds the Int64 "
            f"nano-USD bound ({INT64_MAX}); token counts are implausible"
        )
    return cost_nanos


def price_record(record: Mapping[str, Any], at: datetime, table: PriceTable = EMPTY_TABLE) -> PriceResult:
    """Price a decoded UsageEvent that arrived without ``cost_nanos``.

    The processor and the ledger sink both price through this one function (the served model,
    else the requested one), so a window total and the ledger can never disagree on a price.
    Raises :class:`UnknownModelError` when the table rejects unknown models.
    """
    return price_usage(
        record["provider"],
        record["model_served"] or record["model_requested"],
        record["input_tokens"],
        record["output_tokens"],
        record["cached_input_tokens"],
        record["cache_write_tokens"],
        at,
        table,
    )
