"""``spendstream ledger reprice`` prices with the policy in force, on a real chDB ledger and through the CLI.

A user session repriced a self-hosted model: list prices alone put its override-priced rows ($0.00003) at the
unknown-model price ($0.0525) without a word, and with the policy given it crashed comparing naive and aware times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from spendstream.analytics.reprice import policy_pricer, reprice
from spendstream.core.codec import AvroCodec
from spendstream.core.config import load_settings
from spendstream.core.events import PolicyRecord
from spendstream.core.policy import load_policy, parse_policy
from spendstream.core.policy_log import LAST_POLICY_FILE

DB = "spendstream"
REFERENCE_POLICY = Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml"
COLUMNS = [
    "event_id", "occurred_at", "org", "team", "provider", "model_requested", "model_served", "input_tokens",
    "output_tokens", "cached_input_tokens", "cost_nanos", "price_source", "status", "arrived_at",
]  # fmt: skip
LLAMA = "override:local/llama-3.2-1b"
# The reference policy's llama-3.2-1b override is $0.02/M in and out: 1,500 tokens cost 30,000 nanos; the
# unknown-model price it was repriced at ($15/M in, $75/M out) is 52,500,000.
OVERRIDE_COST, PLACEHOLDER_COST = 30_000, 52_500_000
NEGOTIATED = """name: negotiated
pricing:
  overrides:
    - {provider: openai, model: gpt-4o-mini, input_per_mtok: "0.10", output_per_mtok: "0.40",
       effective_from: 2026-11-01}
"""


def usage(when: datetime, model: str, provider: str, cost: int, source: str, team: str = "product") -> list[Any]:
    return [uuid.uuid4(), when, "acme", team, provider, model, model, 1000, 500, 0, cost, source, "ok", when]


def record_policy(data_dir: Path, path: Path) -> None:
    """What ``spendstream dev`` leaves in its data directory after applying ``path``: the record in force."""
    policy = load_policy(path)
    record = PolicyRecord(name=policy.name, version=policy.version, document=policy.to_json(), published_by="test")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / LAST_POLICY_FILE).write_bytes(AvroCodec("policy").encode(record.to_avro()))


def seed(data_dir: Path, rows: list[list[Any]]) -> None:
    """A ledger in ``data_dir`` holding ``rows``, closed again so the CLI can open it."""
    from spendstream.core.ledger_store import connect, migrate

    settings = load_settings(data_dir=data_dir)
    client = connect(settings)
    try:
        migrate(client, settings)
        client.insert(f"{DB}.usage_ledger", rows, column_names=COLUMNS)
    finally:
        client.close()


def ledger_rows(data_dir: Path) -> list[tuple[Any, ...]]:
    from spendstream.core.ledger_store import connect

    client = connect(load_settings(data_dir=data_dir))
    try:
        return client.query(
            f"SELECT event_id, toString(occurred_at), toString(arrived_at), cost_nanos, price_source "
            f"FROM {DB}.usage_ledger FINAL ORDER BY occurred_at"
        ).result_rows
    finally:
        client.close()


def cli_reprice(data_dir: Path, model: str, day: str, policy: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, on a machine whose local time is not UTC (New York)."""
    env = {k: v for k, v in os.environ.items() if k != "SPENDSTREAM_POLICY"}
    env |= {"SPENDSTREAM_DATA_DIR": str(data_dir), "TZ": "America/New_York"}
    if policy is not None:
        env["SPENDSTREAM_POLICY"] = str(policy)
    argv = ["ledger", "reprice", "--model", model, "--from", day, "--to", day, "--format", "json"]
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_reprice_prices_with_the_policy_dev_recorded_and_refuses_without_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seed(data_dir, [usage(datetime(2026, 11, 3, 9, tzinfo=UTC), "llama-3.2-1b", "local", OVERRIDE_COST, LLAMA)])
    before = ledger_rows(data_dir)

    refused = cli_reprice(data_dir, "llama-3.2-1b", "2026-11-03")
    assert refused.returncode == 2, refused.stdout
    assert "no policy to price with" in refused.stderr and "SPENDSTREAM_POLICY" in refused.stderr
    assert "Traceback" not in refused.stderr and ledger_rows(data_dir) == before

    record_policy(data_dir, REFERENCE_POLICY)  # as `spendstream dev --policy infra/policy/default.yaml` leaves it
    done = cli_reprice(data_dir, "llama-3.2-1b", "2026-11-03")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["params"]["changed"] == 0 and report["params"]["examined"] == 1
    version = load_policy(REFERENCE_POLICY).version
    assert any(f"priced with policy default version {version}" in note and LAST_POLICY_FILE in note
               for note in report["notes"])  # fmt: skip
    assert ledger_rows(data_dir) == before


def test_reprice_with_an_effective_dated_override_keeps_every_row_where_it_was(tmp_path: Path) -> None:
    """The override's dates are aware and the ledger's times come back naive: the comparison raised TypeError. The
    rows go back at the instant they were read, not shifted by the machine's UTC offset (a row at 23:30 UTC moved to
    the next day and was counted twice)."""
    data_dir = tmp_path / "data"
    negotiated = tmp_path / "negotiated.yaml"
    negotiated.write_text(NEGOTIATED)
    rows = [
        usage(datetime(2026, 10, 31, 23, 30, tzinfo=UTC), "gpt-4o-mini", "openai", 450_000, "genai-prices:x"),
        usage(datetime(2026, 11, 1, 23, 30, tzinfo=UTC), "gpt-4o-mini", "openai", 450_000, "genai-prices:x"),
    ]
    seed(data_dir, rows)
    for day in ("2026-10-31", "2026-11-01"):
        done = cli_reprice(data_dir, "gpt-4o-mini", day, negotiated)
        assert done.returncode == 0, done.stderr
    after = ledger_rows(data_dir)
    assert [(r[0], r[1], r[2]) for r in after] == [
        (rows[0][0], "2026-10-31 23:30:00.000000", "2026-10-31 23:30:00.000"),
        (rows[1][0], "2026-11-01 23:30:00.000000", "2026-11-01 23:30:00.000"),
    ]
    before_override, under_override = after
    assert before_override[4].startswith("genai-prices:openai/gpt-4o-mini")  # list price before 1 November
    assert under_override[3:] == (1000 * 100 + 500 * 400, "override:openai/gpt-4o-mini")


def test_a_price_is_never_replaced_by_the_unknown_model_placeholder(ledger: Any) -> None:
    """A policy without the override the rows were priced by leaves them as they were, and the report says why."""
    llama = usage(datetime(2026, 11, 3, 9, tzinfo=UTC), "llama-3.2-1b", "local", OVERRIDE_COST, LLAMA)
    ledger.insert(f"{DB}.usage_ledger", [llama], column_names=COLUMNS)
    bare = policy_pricer(parse_policy("name: bare\n").price_table)
    result = reprice(ledger, DB, "llama-3.2-1b", date(2026, 11, 1), date(2026, 11, 30), bare)
    assert (result.examined, result.changed, dict(result.kept)) == (1, 0, {LLAMA: 1})
    report = result.report("llama-3.2-1b", date(2026, 11, 1), date(2026, 11, 30), "policy bare")
    assert report.params["kept"] == 1
    assert any(f"1 rows priced by {LLAMA} kept as they were" in note and "pricing.overrides" in note
               for note in report.notes)  # fmt: skip
    kept = ledger.query(f"SELECT cost_nanos, price_source FROM {DB}.usage_ledger FINAL").result_rows
    assert kept == [(OVERRIDE_COST, LLAMA)]
    assert ledger.query(f"SELECT count() FROM {DB}.reprice_audit").result_rows == [(0,)]
    # a row whose override the policy no longer has, but that has a list price, is repriced, and the report says so
    negotiated = "override:openai/gpt-4o-mini"
    mini = usage(datetime(2026, 11, 3, 9, tzinfo=UTC), "gpt-4o-mini", "openai", 300_000, negotiated)
    ledger.insert(f"{DB}.usage_ledger", [mini], column_names=COLUMNS)
    listed = reprice(ledger, DB, "gpt-4o-mini", date(2026, 11, 1), date(2026, 11, 30), bare)
    assert listed.changed == 1 and not listed.kept
    notes = listed.report("gpt-4o-mini", date(2026, 11, 1), date(2026, 11, 30)).notes
    assert f"1 rows priced by {negotiated} are now priced by genai-prices:openai/gpt-4o-mini" in " ".join(notes)
