"""``spendstream ledger reprice``: recompute the cost of past ledger rows from a corrected price table.

The ledger row is re-inserted with the new cost (ReplacingMergeTree keeps the last insert of an
event_id, so FINAL reads the corrected figure), the old figure goes to ``reprice_audit`` first,
and the rollup days touched are rebuilt. Work proceeds one UTC day at a time to bound memory.

Prices come from a policy (``pricing_policy``: ``SPENDSTREAM_POLICY``, else the policy ``spendstream dev`` recorded
in force in the data directory): list prices alone repriced a self-hosted model's $0.00003 call at the unknown-model
price, $0.0525, without a word. A price is never replaced by that placeholder (the row is kept and the report says
why), and the report names the policy it priced with.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spendstream.analytics.report_model import Column, Report
from spendstream.analytics.rollup import rebuild_spend_daily

if TYPE_CHECKING:
    from spendstream.core.policy import Policy

# (provider, model, input, output, cached_input, cache_write, at, detail) -> (cost_nanos, price_source); detail is
# the row's reasoning/audio/image/1h-cache/web-search counts and service tier (core.pricing.UsageDetail)
Pricer = Callable[[str, str, int, int, int, int, datetime, Any], tuple[int, str]]

AUDIT_COLUMNS = [
    "reprice_id", "repriced_at", "event_id", "occurred_at", "team", "provider", "model",
    "old_cost_nanos", "new_cost_nanos", "old_price_source", "new_price_source",
]  # fmt: skip
UNKNOWN_MODEL_SOURCE = "default"  # core.pricing's price_source of the unknown-model (placeholder) price


@dataclass(frozen=True)
class PricingPolicy:
    """The policy whose prices a reprice uses, where it was found, and ``warning`` when two policies disagree."""

    policy: Policy
    origin: str
    warning: str = ""

    def describe(self) -> str:
        return f"policy {self.policy.name} version {self.policy.version} ({self.origin})"


def pricing_policy(policy_file: Path | None, data_dir: Path) -> PricingPolicy | None:
    """The policy to price with: ``policy_file`` (``SPENDSTREAM_POLICY``) when set, else the policy ``spendstream dev``
    recorded in force in ``data_dir``; None if neither. Raises ``PolicyError`` or ``OSError`` for a bad file."""
    from spendstream.core.policy import load_policy
    from spendstream.core.policy_log import LAST_POLICY_FILE, last_policy_recorded

    recorded = last_policy_recorded(data_dir)
    recorded_at = data_dir / LAST_POLICY_FILE
    if policy_file is not None:
        policy = load_policy(policy_file)
        warning = ""
        if recorded is not None and recorded[2].version != policy.version:
            warning = (
                f"SPENDSTREAM_POLICY ({policy_file}, version {policy.version}) is not the policy `spendstream dev` "
                f"recorded in force ({recorded[1].name} version {recorded[2].version}, {recorded_at}): pricing with "
                "SPENDSTREAM_POLICY as set; unset it to price with the policy in force"
            )
        return PricingPolicy(policy, f"SPENDSTREAM_POLICY={policy_file}", warning)
    if recorded is not None:
        return PricingPolicy(recorded[2], f"in force when `spendstream dev` last ran, recorded in {recorded_at}")
    return None


@dataclass
class TeamDelta:
    rows: int = 0
    old_nanos: int = 0
    new_nanos: int = 0


@dataclass
class RepriceResult:
    reprice_id: uuid.UUID
    examined: int = 0
    changed: int = 0
    teams: dict[str, TeamDelta] = field(default_factory=lambda: defaultdict(TeamDelta))
    # price_source -> rows left as they were: the new price would have been the unknown-model placeholder
    kept: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (old, new) price_source -> rows that lost the override they were priced by
    overrides_lost: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def report(self, model: str, start: date, end: date, pricing: str = "") -> Report:
        rows = [
            {"team": team or "(unattributed)", "rows": d.rows, "old": d.old_nanos, "new": d.new_nanos,
             "difference": d.new_nanos - d.old_nanos}
            for team, d in sorted(self.teams.items())
        ]  # fmt: skip
        totals = {k: sum(r[k] for r in rows) for k in ("rows", "old", "new", "difference")} | {"team": "TOTAL"}
        notes = [f"priced with {pricing}"] if pricing else []
        notes += [
            f"{count} rows priced by {source} kept as they were: the price table has no price for {model} and the "
            f"unknown-model price is a placeholder, never a correction; add {model} to the policy's pricing.overrides "
            "and reprice again"
            for source, count in sorted(self.kept.items())
        ]
        notes += [
            f"{count} rows priced by {old} are now priced by {new}: the policy has no such override at their time"
            for (old, new), count in sorted(self.overrides_lost.items())
        ]
        notes.append("old figures are kept in reprice_audit under this reprice_id")
        params = {"reprice_id": str(self.reprice_id), "examined": self.examined, "changed": self.changed}
        if self.kept:
            params["kept"] = sum(self.kept.values())
        return Report(
            "reprice",
            f"Repriced {model} from {start.isoformat()} to {end.isoformat()}",
            [
                Column("team", "Team"),
                Column("rows", "Rows changed", "int"),
                Column("old", "Old cost", "usd"),
                Column("new", "New cost", "usd"),
                Column("difference", "Difference", "usd"),
            ],
            rows,
            totals,
            params=params,
            notes=notes,
        )


def reprice(
    client: Any, db: str, model: str, start: date, end: date, pricer: Pricer, now: datetime | None = None
) -> RepriceResult:
    """Reprice every ledger row of ``model`` (served, or requested when none was served) on UTC days [start, end],
    but refused calls and cache hits, which cost nothing."""
    result = RepriceResult(uuid.uuid4())
    repriced_at = now or datetime.now(UTC)
    day = start
    while day <= end:
        _reprice_day(client, db, model, day, pricer, repriced_at, result)
        day += timedelta(days=1)
    if result.changed:
        rebuild_spend_daily(client, db, start, end)
    return result


def _reprice_day(
    client: Any, db: str, model: str, day: date, pricer: Pricer, repriced_at: datetime, result: RepriceResult
) -> None:
    found = client.query(
        f"SELECT * EXCEPT ingested_at FROM {db}.usage_ledger FINAL WHERE toDate(occurred_at) = {{d:Date}} "
        "AND if(model_served != '', model_served, model_requested) = {m:String} "
        # a refused call reached no model and a cache hit no provider: both cost nothing at any price (a per-request
        # override charged them; an attacker session)
        "AND status != 'blocked' AND NOT cache_hit",
        parameters={"d": day, "m": model},
        settings={"do_not_merge_across_partitions_select_final": 1},
    )
    from spendstream.core.pricing import as_utc, detail_of

    names = list(found.column_names)
    at = {n: i for i, n in enumerate(names)}
    audit, replaced = [], []
    for read in found.result_rows:
        # The client returns the UTC columns naive: aware here, so an override's effective dates compare with them and
        # the row goes back at the same instant (a naive time is inserted in the machine's local time).
        row = [as_utc(value) if isinstance(value, datetime) else value for value in read]
        result.examined += 1
        new_cost, source = pricer(
            row[at["provider"]], model, row[at["input_tokens"]], row[at["output_tokens"]],
            row[at["cached_input_tokens"]], row[at["cache_write_tokens"]], row[at["occurred_at"]],
            detail_of(dict(zip(names, row, strict=True))),
        )  # fmt: skip
        old_cost, old_source = row[at["cost_nanos"]], row[at["price_source"]]
        if old_cost == new_cost and old_source == source:
            continue
        if source == UNKNOWN_MODEL_SOURCE and old_source != UNKNOWN_MODEL_SOURCE:
            result.kept[old_source or "(no price_source)"] += 1
            continue
        if old_source.startswith("override:") and source != old_source:
            result.overrides_lost[(old_source, source)] += 1
        audit.append(
            [result.reprice_id, repriced_at, row[at["event_id"]], row[at["occurred_at"]], row[at["team"]],
             row[at["provider"]], model, old_cost, new_cost, old_source, source]
        )  # fmt: skip
        new_row = list(row)
        new_row[at["cost_nanos"]], new_row[at["price_source"]] = new_cost, source
        replaced.append(new_row)
        delta = result.teams[row[at["team"]]]
        delta.rows += 1
        delta.old_nanos += old_cost or 0
        delta.new_nanos += new_cost
    if replaced:
        # The audit first: a crash in between leaves the ledger unchanged and a rerun redoes the day.
        client.insert(f"{db}.reprice_audit", audit, column_names=AUDIT_COLUMNS)
        client.insert(f"{db}.usage_ledger", replaced, column_names=names)
        result.changed += len(replaced)


def policy_pricer(price_table: Any = None) -> Pricer:
    """A ``Pricer`` backed by ``core.pricing.price_usage`` and the policy's price table."""
    from spendstream.core.pricing import EMPTY_TABLE, price_usage

    table = EMPTY_TABLE if price_table is None else price_table

    def price(
        provider: str, model: str, inp: int, out: int, cached: int, write: int, at: datetime, detail: Any
    ) -> tuple[int, str]:
        priced = price_usage(provider, model, inp, out, cached, write, at, table, detail)
        return priced.cost_nanos, priced.source

    return price
