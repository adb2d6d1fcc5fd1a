"""A report as data (columns with kinds, rows of integers/text) and its three renderings.

Money stays integer nano-USD inside a report; each renderer turns it into USD at the edge:
the terminal table rounds to the cent, CSV and JSON keep the exact nine-decimal figure.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from spendstream.analytics.money import fmt_pct, usd_str
from spendstream.core.money_text import usd_text

Kind = Literal["text", "usd", "pct", "int", "ms", "date"]
FORMATS = ("table", "csv", "json")


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    kind: Kind = "text"


@dataclass
class Report:
    """``rows`` hold raw values: nanos (int) for ``usd``, Decimal ratios for ``pct``."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    totals: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: money as ``<key>_nanos`` (int) and ``<key>_usd`` (exact string)."""
        return {
            "report": self.name,
            "title": self.title,
            "params": {k: _plain(v) for k, v in self.params.items()},
            "columns": [{"key": c.key, "title": c.title, "kind": c.kind} for c in self.columns],
            "rows": [_json_row(self.columns, row) for row in self.rows],
            "totals": _json_row(self.columns, self.totals) if self.totals is not None else None,
            "notes": self.notes,
        }


def report_from_json(doc: dict[str, Any]) -> Report:
    """The inverse of ``Report.to_json`` (what ``GET /v1/reports/...`` returns), for rendering elsewhere."""
    columns = [Column(c["key"], c["title"], c["kind"]) for c in doc["columns"]]

    def row(values: dict[str, Any] | None) -> dict[str, Any] | None:
        if values is None:
            return None
        out: dict[str, Any] = {}
        for col in columns:
            if col.kind == "usd":
                out[col.key] = values.get(f"{col.key}_nanos")
            elif col.kind == "pct" and values.get(col.key) is not None:
                out[col.key] = Decimal(str(values[col.key]))
            else:
                out[col.key] = values.get(col.key)
        return out

    return Report(
        name=doc["report"],
        title=doc["title"],
        columns=columns,
        rows=[row(r) or {} for r in doc["rows"]],
        totals=row(doc.get("totals")),
        params=doc.get("params", {}),
        notes=doc.get("notes", []),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def _json_row(columns: list[Column], row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in columns:
        value = row.get(col.key)
        if col.kind == "usd":
            out[f"{col.key}_nanos"] = value
            out[f"{col.key}_usd"] = None if value is None else usd_str(value)
        else:
            out[col.key] = _plain(value)
    return out


def cell_text(kind: Kind, value: Any) -> str:
    """How a value reads in the terminal table."""
    if value is None:
        return "" if kind == "text" else "-"
    if kind == "usd":
        return usd_text(value)  # a call of a few hundred-thousandths of a dollar does not read $0.00
    if kind == "pct":
        return fmt_pct(value)
    if kind == "int":
        return f"{value:,}"
    if kind == "ms":
        return f"{value:,} ms"
    return value if isinstance(value, str) else str(_plain(value))


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMERAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def spreadsheet_text(text: str) -> str:
    """A text cell a spreadsheet shows as text: one that starts like a formula (``=HYPERLINK(...)``, ``+1+cmd``,
    ``@SUM``) gets a leading ``'``, so a team, feature or user name that any caller can set does not run as a
    formula in the finance team's spreadsheet. A plain number (``-0.011970003``, a negative variance as
    ``spendstream sql`` writes a Decimal) is left as it is: it runs nothing, and quoted it would not add up."""
    if text.startswith(_FORMULA_STARTS) and not _NUMERAL.fullmatch(text):
        return "'" + text
    return text


def _csv_cell(kind: Kind, value: Any) -> str:
    if value is None:
        return ""
    if kind == "usd":
        return usd_str(value)
    if kind == "text" and isinstance(value, str):
        return spreadsheet_text(value)
    return str(_plain(value))


def render_table(report: Report) -> str:
    """An aligned text table; a one-row report reads better as ``title: value`` lines."""
    lines = [report.title]
    if report.params:
        lines.append("  " + "  ".join(f"{k}={_plain(v)}" for k, v in report.params.items()))
    lines.append("")
    if not report.rows:
        lines.append("(no data)")
    elif len(report.rows) == 1 and len(report.columns) > 6:
        width = max(len(c.title) for c in report.columns)
        lines += [f"{c.title:<{width}}  {cell_text(c.kind, report.rows[0].get(c.key))}" for c in report.columns]
    else:
        body = [[cell_text(c.kind, row.get(c.key)) for c in report.columns] for row in report.rows]
        if report.totals is not None:
            body.append([cell_text(c.kind, report.totals.get(c.key)) for c in report.columns])
        header = [c.title for c in report.columns]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        right = [c.kind != "text" for c in report.columns]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right, strict=True)
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines += [fmt(header), rule]
        lines += [fmt(r) for r in body[: len(report.rows)]]
        if report.totals is not None:
            lines += [rule, fmt(body[-1])]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def render_csv(report: Report) -> str:
    """One line per row, no TOTAL line: a spreadsheet that sums a column would count every figure twice (the
    table and JSON formats carry the totals)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f"{c.key}_usd" if c.kind == "usd" else c.key for c in report.columns])
    for row in report.rows:
        writer.writerow([_csv_cell(c.kind, row.get(c.key)) for c in report.columns])
    return buf.getvalue()


def render(report: Report, fmt: str) -> str:
    if fmt == "table":
        return render_table(report)
    if fmt == "csv":
        return render_csv(report)
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
