"""``spendstream prices``: load a list-price table offline, and show what a model costs per unit.

The table is genai-prices' data format (its ``data.json``), the database spendstream prices with; an imported
file replaces the bundled data for every service started afterwards from the same data directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from spendstream.core.config import Settings

if TYPE_CHECKING:
    from spendstream.core.pricing import PriceTable

# Price classes as ``prices show`` names them, and the unit each is priced per.
_LABELS = {
    "uncached": ("input", "1M tokens"),
    "cache_read": ("cache read", "1M tokens"),
    "cache_write": ("cache write, 5-minute TTL", "1M tokens"),
    "cache_write_1h": ("cache write, 1-hour TTL", "1M tokens"),
    "input_audio": ("audio input", "1M tokens"),
    "input_image": ("image input", "1M tokens"),
    "output": ("output", "1M tokens"),
    "reasoning": ("reasoning output", "1M tokens"),
    "output_audio": ("audio output", "1M tokens"),
    "output_image": ("image output", "1M tokens"),
    "web_search": ("web search", "search"),
    "per_call": ("request", "request"),
}
_TIERS = ("", "batch", "flex", "priority")


def register(subparsers: argparse._SubParsersAction) -> None:
    prices = subparsers.add_parser("prices", help="import list prices offline, show what a model costs")
    commands = prices.add_subparsers(dest="prices_command", metavar="SUBCOMMAND", required=True)
    load = commands.add_parser("import", help="load a price table in genai-prices' data format (no network)")
    load.add_argument("file", help="genai-prices data file (a JSON list of providers, as its data.json)")
    load.set_defaults(handler=run_import)
    show = commands.add_parser("show", help="a model's prices per unit, in nano-USD, as calls are priced")
    show.add_argument("model", help="model name as calls report it, e.g. gpt-4o or claude-sonnet-4-5")
    show.add_argument("--provider", help="provider name (default: the one the price data matches the model to)")
    show.add_argument(
        "--tier", choices=_TIERS[1:], default="", help="service tier: batch API, flex or priority (default standard)"
    )
    show.add_argument("--at", type=_instant, help="price date, YYYY-MM-DD (default now)")
    show.set_defaults(handler=run_show)


def _instant(text: str) -> datetime:
    try:
        from spendstream.core.pricing import as_utc

        return as_utc(datetime.fromisoformat(text))  # an offset given is kept, not replaced by UTC
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from spendstream.core.pricing import use_price_data

    source = Path(args.file)
    try:
        models = use_price_data(source)  # validates it: nothing is replaced by a file that cannot be used
    except ValueError as exc:
        print(f"spendstream prices import: {exc}", file=sys.stderr)
        return 1
    target = settings.price_data_path
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(source.read_bytes())
    os.replace(partial, target)
    print(f"spendstream prices import: {models} models from {source} -> {target}; services started from now on use it")
    return 0


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    from spendstream.core.pricing import PARENT_CLASS, UnknownModelError, price_schedule, use_configured_price_data

    use_configured_price_data(settings.price_data_file, settings.price_data_path)
    table, overrides_of = _price_table(settings)
    provider = args.provider or _provider_of(args.model)
    if provider is None:
        print(f"spendstream prices show: no provider in the price data has {args.model!r}; name one with --provider",
              file=sys.stderr)  # fmt: skip
        return 1
    at = args.at or datetime.now(UTC)
    try:
        schedule = price_schedule(provider, args.model, at, table, args.tier)
    except UnknownModelError as exc:
        print(f"spendstream prices show: {exc}", file=sys.stderr)
        return 1
    tier = args.tier or "standard"
    print(f"{provider}/{args.model}: {schedule.source}, {tier} tier, {at:%Y-%m-%d}, in nano-USD")
    print("(a class not listed costs what its parent costs: audio and image input as input, reasoning as output)")
    print(f"(price overrides of {overrides_of})")
    if schedule.flagged_unknown:
        print("(unknown model: the price table's default price, and its events are flagged price=unknown_model)")
    for above, rates in schedule.tiers:
        if above >= 0:
            print(f"prompts above {above} input tokens (every token of the call):")
        for name, (label, unit) in _LABELS.items():
            per_unit = rates[name]
            parent = PARENT_CLASS.get(name)
            if parent is None and not per_unit and name not in ("uncached", "output"):
                continue  # nothing charged per search or per request
            if parent is not None and per_unit == rates[parent]:
                continue  # priced as its parent class (audio input as input, ...)
            amount = per_unit * 1_000_000 if unit == "1M tokens" else per_unit
            print(f"  {label:<28} {_exact(amount):>16} per {unit}")
    return 0


def _exact(amount: Decimal) -> str:
    """An exact nano-USD amount: an integer, with its decimals only where a price has sub-nano precision."""
    return str(int(amount)) if amount == amount.to_integral_value() else format(amount.normalize(), "f")


def _provider_of(model: str) -> str | None:
    """The provider the price data matches ``model`` to, else the first provider that lists it."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        return snapshot.find_provider_model(model, None, None, None)[0].id
    except LookupError:
        pass
    return next((p.id for p in snapshot.providers if any(m.is_match(model) for m in p.models)), None)


def _price_table(settings: Settings) -> tuple[PriceTable, str]:
    """The price overrides ``ledger reprice`` prices with (``SPENDSTREAM_POLICY``, else the policy ``spendstream dev``
    recorded in force), or none, and whose they are."""
    from spendstream.analytics.reprice import pricing_policy
    from spendstream.core.pricing import EMPTY_TABLE

    pricing = pricing_policy(settings.policy, settings.data_dir)
    if pricing is None:
        return EMPTY_TABLE, "no policy (SPENDSTREAM_POLICY is not set, and none is recorded in the data directory)"
    return pricing.policy.price_table, pricing.describe()
