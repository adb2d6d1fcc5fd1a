"""Price one LLM call in integer nano-USD.

API (shared by the gateway, which prices requests, and the processor, which prices events that lack a cost):

- ``normalise_usage(provider, raw_usage) -> NormalisedUsage(input_tokens, cached_read, cache_write, output_tokens)``
  turns a provider's usage block into spendstream's convention: ``input_tokens`` INCLUDES cached reads and
  cache writes (as in ``UsageEvent`` and genai-prices' ``Usage``), so nothing is billed twice or for free.
- ``usage_detail(provider, raw_usage, usage) -> UsageDetail``: what the block says beyond the four counts
  (reasoning, audio and image tokens, 1-hour cache writes, web searches, the service tier).
- ``price_usage(provider, model, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, at,
  overrides, detail) -> PriceResult(cost_nanos, source, flagged_unknown)``: each unit of the call in one of
  twelve price classes (``_CLASSES``), at the long-context tier its input reaches and the tier's price list.
- ``PriceTable``: the user's override rows (negotiated rates, self-hosted models priced by GPU time), what to do
  with an unknown model (``"default_price"``: price it at ``default_price`` and flag it, or ``"reject"``: raise
  ``UnknownModelError`` so the caller sends the event to the DLQ), and a content ``version``.

Rounding: the exact Decimal cost is converted to nano-USD with ROUND_HALF_EVEN (unbiased, so the rounding error
of millions of events sums to about zero instead of drifting one way), with one exception: a call whose exact
cost is positive is never recorded below 1 nano, so a paid call never looks free. A 10-token call at
$0.075/M is exactly 750 nanos; no rounding happens at all for prices with at most 3 decimals per million tokens.

Speed: genai-prices costs ~70 us per lookup, so the per-unit rates of a (provider, model, price version,
minute, service tier) are resolved once (one genai-prices call per class and long-context tier) and memoised;
pricing a call is then a few integer (or Decimal) multiplications.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple

from genai_prices import Usage, calc_price, data_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from spendstream.core.config import ConfigError
from spendstream.core.providers import NO_DETAIL, NormalisedUsage, UsageDetail, dialect_for

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
    """USD per million tokens, as Decimals (never floats).

    ``None`` rates fall back to their parent's: cache reads and writes, audio and image input to the input
    rate, 1-hour cache writes to the cache write rate, reasoning and audio and image output to the output rate.
    ``per_request`` (USD a call) and ``web_search_per_1000`` (USD per 1000 searches) price what is not tokens.
    Above ``long_context_above`` input tokens, every token of the call is priced at ``long_context`` instead
    (its token rates; the per-request and per-search prices and the batch multiplier stay this row's);
    a batch call costs ``batch_multiplier`` times the rates (``None``: the batch API is not discounted).
    """

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    cache_write_1h_per_mtok: Decimal | None = None
    reasoning_per_mtok: Decimal | None = None
    input_audio_per_mtok: Decimal | None = None
    output_audio_per_mtok: Decimal | None = None
    input_image_per_mtok: Decimal | None = None
    output_image_per_mtok: Decimal | None = None
    per_request: Decimal = Decimal(0)
    web_search_per_1000: Decimal = Decimal(0)
    long_context_above: int | None = None
    long_context: Rates | None = None
    batch_multiplier: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """One row of the user's price table; it wins over genai-prices while ``effective_from <= at < effective_to``."""

    provider: str
    model: str
    rates: Rates
    effective_from: datetime | None = None
    effective_to: datetime | None = None

    def __post_init__(self) -> None:
        # A naive bound would make every comparison with an aware time raise (or mean the machine's local time).
        for name in ("effective_from", "effective_to"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value))

    def effective_at(self, at: datetime) -> bool:
        at = as_utc(at)
        return (self.effective_from is None or self.effective_from <= at) and (
            self.effective_to is None or at < self.effective_to
        )


def as_utc(at: datetime) -> datetime:
    """``at`` as an aware time; a naive one is UTC, as spendstream writes every time (the ledger's columns are UTC and
    its client returns them naive). Mixing naive and aware times raised ``TypeError`` in the middle of a reprice,
    and a naive time's ``timestamp()`` would be read in the machine's local time."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # (price_usage's hot path: no more than this)


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


_EXTRA_RATES = (
    "cache_write_1h_per_mtok",
    "reasoning_per_mtok",
    "input_audio_per_mtok",
    "output_audio_per_mtok",
    "input_image_per_mtok",
    "output_image_per_mtok",
    "per_request",
    "web_search_per_1000",
    "long_context_above",
    "long_context",
    "batch_multiplier",
)


def _table_hash(table: PriceTable) -> str:
    def rates(r: Rates) -> list[Any]:
        values: list[Any] = [
            str(v) if v is not None else None
            for v in (r.input_per_mtok, r.output_per_mtok, r.cache_read_per_mtok, r.cache_write_per_mtok)
        ]
        extra = {
            name: getattr(r, name) for name in _EXTRA_RATES if getattr(r, name) not in (None, Decimal(0))
        }  # only what is set, so a table without them keeps its version
        if extra:
            values.append({name: rates(v) if isinstance(v, Rates) else str(v) for name, v in extra.items()})
        return values

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


def usage_detail(provider: str, raw_usage: Mapping[str, Any], usage: NormalisedUsage) -> UsageDetail:
    """What the usage block says beyond the four counts, fitted inside ``usage`` (the provider's own categories
    may overlap: an audio prompt token read from the cache is priced as a cache read)."""
    d = dialect_for(provider).detail(raw_usage)
    free_input = usage.input_tokens - usage.cached_read - usage.cache_write
    audio_in = min(d.input_audio_tokens, free_input)
    image_in = min(d.input_image_tokens, free_input - audio_in)
    reasoning = min(d.reasoning_tokens, usage.output_tokens)
    audio_out = min(d.output_audio_tokens, usage.output_tokens - reasoning)
    image_out = min(d.output_image_tokens, usage.output_tokens - reasoning - audio_out)
    written_1h = min(d.cache_write_1h_tokens, usage.cache_write)
    # (positional, in the field order: a NamedTuple's _replace costs more than the rest of this function)
    return UsageDetail(
        reasoning, audio_in, audio_out, image_in, image_out, written_1h, d.web_search_requests, d.service_tier
    )


# -- pricing -------------------------------------------------------------------------------------------------

# Price classes, in the order of a _Linear's rates: every unit a call is billed for is in exactly one of them.
_CLASSES = (
    "per_call",
    "uncached",  # text (and any other) prompt tokens not counted in another input class
    "cache_read",
    "cache_write",  # written with the default (5-minute) TTL
    "cache_write_1h",
    "input_audio",
    "input_image",
    "output",  # text output that is not reasoning
    "reasoning",
    "output_audio",
    "output_image",
    "web_search",  # per search
)
# genai-prices usage of one million units of each class (with the parent counts it is part of).
_M = _MTOK
_PROBES: dict[str, dict[str, int]] = {
    "uncached": {"input_tokens": _M},
    "cache_read": {"input_tokens": _M, "cache_read_tokens": _M},
    "cache_write": {"input_tokens": _M, "cache_write_tokens": _M},
    "cache_write_1h": {"input_tokens": _M, "cache_write_tokens": _M, "cache_write_1h_tokens": _M},
    "input_audio": {"input_tokens": _M, "input_audio_tokens": _M},
    "input_image": {"input_tokens": _M, "input_image_tokens": _M},
    "output": {"output_tokens": _M},
    "reasoning": {"output_tokens": _M, "output_reasoning_tokens": _M},
    "output_audio": {"output_tokens": _M, "output_audio_tokens": _M},
    "output_image": {"output_tokens": _M, "output_image_tokens": _M},
    "web_search": {"web_searches": _M},
}
# A class genai-prices cannot price on its own (a price table without it) costs what its parent class costs.
PARENT_CLASS = {
    "cache_read": "uncached",
    "cache_write": "uncached",
    "cache_write_1h": "cache_write",
    "input_audio": "uncached",
    "input_image": "uncached",
    "reasoning": "output",
    "output_audio": "output",
    "output_image": "output",
}


class _Linear(NamedTuple):
    """Nano-USD per unit of each price class (``_CLASSES``), as exact Decimals, and where they come from."""

    rates: tuple[Decimal, ...]
    source: str
    flagged: bool
    # The same rates as ints when every one is a whole number of nanos (most list prices: $0.15/M is 150 nanos a
    # token), so a call is priced exactly in integer arithmetic, without Decimal or rounding.
    whole: tuple[int, ...] | None


class _Tiered(NamedTuple):
    """Long-context prices: ``linears[i]`` applies to a whole call whose input tokens exceed ``above[i]``."""

    above: tuple[int, ...]  # ascending; the first is -1 (every call)
    linears: tuple[_Linear, ...]

    def for_input(self, input_tokens: int) -> _Linear:
        chosen = self.linears[0]
        for above, linear in zip(self.above, self.linears, strict=True):
            if input_tokens > above:
                chosen = linear
        return chosen


def _linear(rates: dict[str, Decimal], source: str, flagged: bool) -> _Linear:
    ordered = tuple(rates[name] for name in _CLASSES)
    whole = tuple(int(r) for r in ordered) if all(r == r.to_integral_value() for r in ordered) else None
    return _Linear(ordered, source, flagged, whole)


def _linear_from_rates(rates: Rates, source: str, flagged: bool, service_tier: str = "") -> _Linear | _Tiered:
    """A price-table row as per-unit nano-USD rates (with its long-context tier, and its batch multiplier)."""
    k = _NANOS_PER_TOKEN_PER_USD_PER_MTOK
    multiplier = rates.batch_multiplier if service_tier == "batch" and rates.batch_multiplier is not None else 1

    def fallback(value: Decimal | None, default: Decimal) -> Decimal:
        return value if value is not None else default

    write = fallback(rates.cache_write_per_mtok, rates.input_per_mtok)
    per_mtok = {
        "per_call": rates.per_request * _MTOK,
        "uncached": rates.input_per_mtok,
        "cache_read": fallback(rates.cache_read_per_mtok, rates.input_per_mtok),
        "cache_write": write,
        "cache_write_1h": fallback(rates.cache_write_1h_per_mtok, write),
        "input_audio": fallback(rates.input_audio_per_mtok, rates.input_per_mtok),
        "input_image": fallback(rates.input_image_per_mtok, rates.input_per_mtok),
        "output": rates.output_per_mtok,
        "reasoning": fallback(rates.reasoning_per_mtok, rates.output_per_mtok),
        "output_audio": fallback(rates.output_audio_per_mtok, rates.output_per_mtok),
        "output_image": fallback(rates.output_image_per_mtok, rates.output_per_mtok),
        "web_search": rates.web_search_per_1000 * _MTOK / 1000,
    }
    base = _linear({name: value * k * multiplier for name, value in per_mtok.items()}, source, flagged)
    if rates.long_context is None or rates.long_context_above is None:
        return base
    # The long-context row prices tokens; what is not tokens and the batch multiplier are the row's own.
    long = replace(
        rates.long_context,
        per_request=rates.per_request,
        web_search_per_1000=rates.web_search_per_1000,
        batch_multiplier=rates.batch_multiplier,
        long_context=None,
    )
    above = _linear_from_rates(long, source, flagged, service_tier)
    assert isinstance(above, _Linear)  # a long-context tier has no tier of its own (the policy says so)
    return _Tiered((-1, rates.long_context_above), (base, above))


def _usd_to_nanos_exact(usd: Decimal) -> Decimal:
    return usd * NANOS_PER_USD


def price_context(service_tier: str) -> dict[str, str] | None:
    """genai-prices' request context for a service tier: the batch API, or a provider tier (flex, priority)."""
    if not service_tier:
        return None
    return {"processing": "batch"} if service_tier == "batch" else {"service_tier": service_tier}


def _flat_prices(model_price: Any, above: int | None) -> Any:
    """``model_price`` with each tiered price replaced by the price of a prompt larger than ``above`` tokens."""
    flat: dict[str, Any] = {}
    for key, value in model_price.__dict__.items():
        if isinstance(value, TieredPrices):
            value = next(
                (tier.price for tier in reversed(value.tiers) if above is not None and tier.start <= above), value.base
            )
        flat[key] = value
    return ModelPrice(**flat)


def _probed(model_price: Any, source: str) -> _Linear:
    """Per-unit rates of a price without tiers, measured by pricing one million units of each class."""

    def total(**units: int) -> Decimal:
        return _usd_to_nanos_exact(model_price.calc_price(Usage(**units))["total_price"])

    base = total(input_tokens=0, output_tokens=0)
    rates = {"per_call": base}
    for name in _CLASSES[1:]:
        try:
            rates[name] = (total(**_PROBES[name]) - base) / _MTOK
        except ValueError:  # the price data cannot price this class on its own: it costs what its parent costs
            rates[name] = rates[PARENT_CLASS[name]]
    return _linear(rates, source, False)


def _genai_rates(provider: str, model: str, at: datetime, service_tier: str = "") -> _Linear | _Tiered | None:
    """Per-unit rates from genai-prices (one set per long-context tier), or None for a model it does not know."""
    try:
        calc = calc_price(
            Usage(input_tokens=0, output_tokens=0),
            model,
            provider_id=provider,
            genai_request_timestamp=at,
            price_context=price_context(service_tier),
        )
    except LookupError:
        return None
    mp = calc.model_price
    source = f"genai-prices:{calc.provider.id}/{calc.model.id}" + (f"+{service_tier}" if service_tier else "")
    starts = sorted(
        {tier.start for value in mp.__dict__.values() if isinstance(value, TieredPrices) for tier in value.tiers}
    )
    if not starts:
        return _probed(mp, source)
    return _Tiered((-1, *starts), tuple(_probed(_flat_prices(mp, above), source) for above in (None, *starts)))


_MEMO: dict[tuple[str, str, int, str, str], _Linear | _Tiered] = {}
_MEMO_MAX = 65_536
_CONTEXT_WINDOWS: dict[tuple[str, str], int | None] = {}


def context_window(provider: str, model: str) -> int | None:
    """The most tokens a call to ``model`` can hold (prompt and answer), from the price data; None if unknown."""
    key = (provider, model)
    if key not in _CONTEXT_WINDOWS:
        try:
            found = calc_price(Usage(input_tokens=0, output_tokens=0), model, provider_id=provider).model
            _CONTEXT_WINDOWS[key] = found.context_window or None
        except LookupError:
            _CONTEXT_WINDOWS[key] = None
        if len(_CONTEXT_WINDOWS) > _MEMO_MAX:
            _CONTEXT_WINDOWS.clear()
    return _CONTEXT_WINDOWS[key]


def _resolve(provider: str, model: str, minute: datetime, table: PriceTable, service_tier: str) -> _Linear | _Tiered:
    row = table.override_for(provider, model, minute)
    if row is not None:
        return _linear_from_rates(row.rates, f"override:{row.provider}/{row.model}", False, service_tier)
    found = _genai_rates(provider, model, minute, service_tier)
    if found is not None:
        return found
    if table.unknown_model == "reject":
        raise UnknownModelError(f"no price for provider={provider!r} model={model!r} and unknown_model=reject")
    return _linear_from_rates(table.default_price, "default", True, service_tier)


# -- list price data ----------------------------------------------------------------------------------------


def read_price_data(path: Path) -> list[Any]:
    """The providers of a price file in genai-prices' data format (its ``data.json``: a JSON list of providers,
    each with its models and their prices), validated; ``ValueError`` says what is wrong with it."""
    from genai_prices.types import _providers_from_raw  # what genai-prices' own updater parses data.json with

    try:
        raw = json.loads(path.read_bytes(), parse_float=Decimal)  # prices stay exact: 0.075 is not a float
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected genai-prices data: a JSON list of providers")
    try:
        return _providers_from_raw(raw)
    except ValueError as exc:  # pydantic's ValidationError names the provider, model and field
        raise ValueError(f"{path}: not genai-prices data: {str(exc)[:2000]}") from None


def use_price_data(path: Path) -> int:
    """Price with the list prices of ``path`` from now on (overrides still win); returns how many models it has."""
    providers = read_price_data(path)
    data_snapshot.set_custom_snapshot(data_snapshot.DataSnapshot(providers=providers, from_auto_update=False))
    _MEMO.clear()
    _CONTEXT_WINDOWS.clear()
    return sum(len(provider.models) for provider in providers)


def use_configured_price_data(price_data_file: Path | None, default_path: Path) -> None:
    """At start: the configured price file (``SPENDSTREAM_PRICE_DATA_FILE``, which must exist), else the one
    ``spendstream prices import`` left in the data directory, else genai-prices' bundled data."""
    path = price_data_file or default_path
    if price_data_file is None and not default_path.exists():
        return
    try:
        use_price_data(path)
    except ValueError as exc:
        raise ConfigError(f"price_data_file: {exc}") from None


class PriceSchedule(NamedTuple):
    """Nano-USD per unit of every price class, per long-context tier (``above`` -1: every call)."""

    source: str
    flagged_unknown: bool
    tiers: tuple[tuple[int, dict[str, Decimal]], ...]


def price_schedule(
    provider: str, model: str, at: datetime, table: PriceTable = EMPTY_TABLE, service_tier: str = ""
) -> PriceSchedule:
    """What ``price_usage`` charges for ``model`` at ``at``: the rate of each class, for ``spendstream prices show``."""
    resolved = _resolve(provider, model, as_utc(at), table, service_tier)
    tiers = resolved if isinstance(resolved, _Tiered) else _Tiered((-1,), (resolved,))
    first = tiers.linears[0]
    return PriceSchedule(
        first.source,
        first.flagged,
        tuple(
            (above, dict(zip(_CLASSES, linear.rates, strict=True)))
            for above, linear in zip(tiers.above, tiers.linears, strict=True)
        ),
    )


def to_nanos(exact_nanos: Decimal) -> int:
    """Round an exact nano-USD amount half-even, but never a positive amount down to zero."""
    nanos = int(exact_nanos.to_integral_value(rounding=ROUND_HALF_EVEN))
    if nanos == 0 and exact_nanos > 0:
        return 1
    return nanos


def usd_to_nanos(usd: Decimal | int | str) -> int:
    """Exact conversion of a human USD amount (``"8000"``, ``Decimal("0.01")``) to integer nanos."""
    return to_nanos(Decimal(usd) * NANOS_PER_USD)


def whole_nanos(usd: Decimal | int | str) -> int:
    """An amount a person sets (a budget, a ceiling, a request) in integer nano-USD, refused rather than rounded when
    it is finer than a nano-dollar: ``0.00000000001`` became $0.000000001, ten times what was written, and
    ``1.0000000005`` lost its last digit, both without a word."""
    amount = Decimal(usd)
    if not amount.is_finite():
        raise ValueError(f"{usd} is not an amount of USD")
    exact = amount * NANOS_PER_USD
    if exact != exact.to_integral_value():
        raise ValueError(f"{amount:f} USD is finer than a nano-dollar (at most 9 decimal places)")
    return int(exact)


def has_own_price(provider: str, model: str, table: PriceTable = EMPTY_TABLE) -> bool:
    """Whether ``table`` prices ``model`` as itself (an override or genai-prices), not at the unknown-model price."""
    try:
        return not price_usage(provider, model, 0, 0, overrides=table).flagged_unknown
    except (UnknownModelError, ValueError):
        return False


def has_price(provider: str, model: str, table: PriceTable = EMPTY_TABLE) -> bool:
    """Whether ``table`` prices ``model``: an override, genai-prices, or the default price for unknown models."""
    try:
        price_usage(provider, model, 0, 0, overrides=table)
    except UnknownModelError:
        return False
    return True


def price_usage(
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    at: datetime | None = None,
    overrides: PriceTable = EMPTY_TABLE,
    detail: UsageDetail = NO_DETAIL,
) -> PriceResult:
    """Cost of one call at ``at`` (default now; a naive time is UTC). ``input_tokens`` includes
    ``cached_input_tokens`` and ``cache_write_tokens``.

    ``detail`` refines the counts (reasoning, audio and image tokens, 1-hour cache writes, web searches) and
    names the service tier (batch, flex, priority); every detail count is a subset of a count above.
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
    # Memoised per (provider, model, minute, table version, tier); the minute covers genai-prices' time-of-day
    # prices. The key holds the minute as a number: building the datetime costs more than the rest of a call.
    at = as_utc(at) if at is not None else datetime.now(UTC)
    tier = detail.service_tier
    key = (provider, model, int(at.timestamp() // 60), overrides.version, tier)
    resolved = _MEMO.get(key)
    if resolved is None:
        resolved = _resolve(provider, model, at.replace(second=0, microsecond=0), overrides, tier)
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = resolved
    linear = resolved if isinstance(resolved, _Linear) else resolved.for_input(input_tokens)
    if detail is NO_DETAIL or detail == NO_DETAIL:
        whole = linear.whole
        if whole is not None:  # _CLASSES order: per call, uncached, cache read, cache write, ..., output (7)
            cost = (
                whole[0]
                + uncached * whole[1]
                + cached_input_tokens * whole[2]
                + cache_write_tokens * whole[3]
                + output_tokens * whole[7]
            )
            return PriceResult(_bounded(cost, provider, model), linear.source, linear.flagged)
        units: tuple[int, ...] = (1, uncached, cached_input_tokens, cache_write_tokens, 0, 0, 0, output_tokens)
    else:
        units = _detailed_units(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, detail)
    if linear.whole is not None:
        cost = sum(map(operator.mul, units, linear.whole))
    else:
        cost = to_nanos(sum(map(operator.mul, units, linear.rates), Decimal(0)))
    return PriceResult(_bounded(cost, provider, model), linear.source, linear.flagged)


def _detailed_units(
    input_tokens: int, output_tokens: int, cached: int, written: int, detail: UsageDetail
) -> tuple[int, ...]:
    """Units of each price class (``_CLASSES`` order) of a call with detail counts; each unit in one class."""
    if min(detail[:7]) < 0:
        raise ValueError(f"detail counts must not be negative: {detail}")
    text_input = input_tokens - cached - written - detail.input_audio_tokens - detail.input_image_tokens
    text_output = output_tokens - detail.reasoning_tokens - detail.output_audio_tokens - detail.output_image_tokens
    written_5m = written - detail.cache_write_1h_tokens
    if min(text_input, text_output, written_5m) < 0:
        raise ValueError(f"detail counts exceed the token counts they are part of: {detail}")
    return (
        1,
        text_input,
        cached,
        written_5m,
        detail.cache_write_1h_tokens,
        detail.input_audio_tokens,
        detail.input_image_tokens,
        text_output,
        detail.reasoning_tokens,
        detail.output_audio_tokens,
        detail.output_image_tokens,
        detail.web_search_requests,
    )


def _bounded(cost_nanos: int, provider: str, model: str) -> int:
    if cost_nanos > INT64_MAX:
        raise CostOverflowError(
            f"cost of {cost_nanos} nano-USD for provider={provider!r} model={model!r} exceeds the Int64 "
            f"nano-USD bound ({INT64_MAX}); token counts are implausible"
        )
    return cost_nanos


def detail_of(record: Mapping[str, Any]) -> UsageDetail:
    """The detail counts of a UsageEvent record (an event written before they existed has none)."""
    return UsageDetail(
        record.get("reasoning_tokens", 0),
        record.get("input_audio_tokens", 0),
        record.get("output_audio_tokens", 0),
        record.get("input_image_tokens", 0),
        record.get("output_image_tokens", 0),
        record.get("cache_write_1h_tokens", 0),
        record.get("web_search_requests", 0),
        record.get("service_tier", ""),
    )


def price_record(record: Mapping[str, Any], at: datetime, table: PriceTable = EMPTY_TABLE) -> PriceResult:
    """Price a decoded UsageEvent that arrived without ``cost_nanos``.

    The processor and the ledger sink both price through this one function (the served model,
    else the requested one), so a window total and the ledger can never disagree on a price.
    Raises :class:`UnknownModelError` when the table rejects unknown models. A call the edge refused (``blocked``)
    reached no model: it costs nothing, whatever tokens it names.
    """
    if record.get("status") == "blocked":
        return PriceResult(0, "", False)
    return price_usage(
        record["provider"],
        record["model_served"] or record["model_requested"],
        record["input_tokens"],
        record["output_tokens"],
        record["cached_input_tokens"],
        record["cache_write_tokens"],
        at,
        table,
        detail_of(record),
    )


def unpriced_model_problem(model: str, overridden: Iterable[str] = ()) -> str | None:
    """Why ``model`` has no list price (neither in ``overridden``, the models a price table overrides, nor in the
    price data genai-prices finds it in, whatever its provider), naming the nearest known model; else None.

    For a policy's checks: a model name with a typo would be priced at the table's default rates, or refused.
    """
    if model in set(overridden):
        return None
    try:
        calc_price(Usage(input_tokens=0, output_tokens=0), model)
        return None
    except LookupError:
        pass
    known = {m.id for provider in data_snapshot.get_snapshot().providers for m in provider.models} | set(overridden)
    near = difflib.get_close_matches(model, known, n=1, cutoff=0.75)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"{model} has no list price{hint}"
