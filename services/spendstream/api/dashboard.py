"""The dashboard page: plain HTML with inline SVG charts drawn here (no script, no CDN, works offline).

Pure functions from report data to markup, so a test can check every figure on the page.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from html import escape
from typing import Any

from spendstream.analytics.money import fmt_pct, usd
from spendstream.analytics.report_model import Report

PALETTE = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#65a30d", "#475569")
THRESHOLDS = ((0.8, "80%"), (0.9, "90%"), (1.0, "100%"))


WHOLE_DOLLARS_FROM_NANOS = 100_000 * 10**9


def money(nanos: int) -> str:
    """A figure for people, as precise as its size needs: at least two significant digits and at least cents
    (``$0.0031``, ``$0.042``, ``$12.50``), whole dollars from $100,000 (``$4,000,000`` fits where cents would not).

    With a few cents of spend a model's share must not read ``$0.00``.
    """
    if nanos == 0:
        return "$0.00"
    value = usd(abs(nanos))
    places = 0 if abs(nanos) >= WHOLE_DOLLARS_FROM_NANOS else max(2, -value.adjusted() + 1)
    sign = "-" if nanos < 0 else ""
    return f"{sign}${value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN):,f}"


def axis_labels(peak_nanos: int, fractions: tuple[float, ...] = (0, 0.5, 1)) -> list[str]:
    """Labels for the gridlines at ``fractions`` of the peak, with the decimals their step needs to differ.

    $300 steps of $150 read ``$150``; a peak of five cents reads ``$0.025`` and ``$0.050``, never ``$0``.
    """
    step = usd(peak_nanos) * Decimal(str(min(f for f in fractions if f > 0)))
    places = max(0, -step.adjusted() + 1) if step > 0 else 0
    quantum = Decimal(1).scaleb(-places)
    return [f"${(usd(peak_nanos) * Decimal(str(f))).quantize(quantum, rounding=ROUND_HALF_EVEN):,f}" for f in fractions]


def _f(nanos: int) -> float:
    """Chart coordinates only: money figures shown as text always come from ``money`` or ``axis_labels``."""
    return float(usd(nanos))


def trend_chart(trend: dict[str, dict[date, int]], start: date, end: date, width: int = 640, height: int = 240) -> str:
    """Spend per day per team as one line per team."""
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    peak_nanos = max([v for series in trend.values() for v in series.values()] or [0]) or 10**9
    peak = _f(peak_nanos)
    left, bottom, top, right = 64, 28, 12, 190
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i: int, value: float) -> str:
        x = left + (plot_w * i / max(1, len(days) - 1))
        return f"{x:.1f},{top + plot_h - plot_h * value / peak:.1f}"

    parts = [f'<svg class="chart" id="trend" viewBox="0 0 {width} {height}" role="img" aria-label="spend per day">']
    fractions = (0, 0.5, 1)
    for frac, label in zip(fractions, axis_labels(peak_nanos, fractions), strict=True):
        y = top + plot_h - plot_h * frac
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">{label}</text>')
    for i in (0, len(days) - 1):
        parts.append(f'<text x="{xy(i, 0).split(",")[0]}" y="{height - 8}" class="axis" text-anchor="middle">'
                     f"{days[i]:%b %d}</text>")  # fmt: skip
    for n, (team, series) in enumerate(sorted(trend.items())):
        color = PALETTE[n % len(PALETTE)]
        points = " ".join(xy(i, _f(series.get(d, 0))) for i, d in enumerate(days))
        parts.append(f'<polyline class="series" data-team="{escape(team)}" fill="none" stroke="{color}" '
                     f'stroke-width="2" points="{points}"/>')  # fmt: skip
        total = sum(series.values())
        parts.append(f'<rect x="{width - right + 10}" y="{top + n * 18}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{width - right + 26}" y="{top + n * 18 + 9}" class="legend">{escape(team)} '
                     f"{money(total)}</text>")  # fmt: skip
    if not trend:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no spend yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def _level(used: float) -> str:
    return "over" if used >= 1.0 else "high" if used >= 0.9 else "warn" if used >= 0.8 else "ok"


def utilisation_chart(chargeback: Report, width: int = 640) -> str:
    """Budget used per department, with the 80/90/100% threshold lines."""
    rows = [r for r in chargeback.rows if r["budget"] > 0]
    if not rows:
        return (
            '<p class="empty" id="no-budgets">No budgets in the ledger for this month: they are loaded from the '
            "policy in force (<code>spendstream policy apply FILE</code>).</p>"
        )
    left, bar, gap, top = 120, 18, 10, 22
    plot_w = width - left - 150
    scale = 1.25  # the x axis runs to 125% so overspend stays visible
    height = top + len(rows) * (bar + gap) + 10
    parts = [f'<svg class="chart" id="utilisation" viewBox="0 0 {width} {height}" role="img" aria-label="budget used">']
    for frac, label in THRESHOLDS:
        x = left + plot_w * frac / scale
        parts.append(f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{top - 6}" y2="{height - 6}"/>')
        parts.append(f'<text x="{x:.1f}" y="{top - 10}" class="axis" text-anchor="middle">{label}</text>')
    for i, r in enumerate(rows):
        used = r["actual"] / r["budget"]
        y = top + i * (bar + gap)
        w = plot_w * min(used, scale) / scale
        parts.append(
            f'<text x="{left - 8}" y="{y + 13}" text-anchor="end" class="label">{escape(r["department"])}</text>'
        )
        parts.append(f'<rect class="bar {_level(used)}" data-team="{escape(r["department"])}" x="{left}" y="{y}" '
                     f'width="{max(w, 1):.1f}" height="{bar}" rx="3"/>')  # fmt: skip
        parts.append(f'<text x="{left + plot_w + 8}" y="{y + 13}" class="label">{fmt_pct(r["utilisation"])} of '
                     f'{money(r["budget"])}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def bars_chart(chart_id: str, items: list[tuple[str, int, str]], width: int = 640) -> str:
    """Horizontal bars (label, nanos, caption), scaled to the largest."""
    left, bar, gap = 200, 16, 8
    peak = max([v for _, v, _ in items] or [0]) or 1
    plot_w = width - left - 190
    height = len(items) * (bar + gap) + 8
    parts = [f'<svg class="chart" id="{chart_id}" viewBox="0 0 {width} {max(height, 30)}" role="img">']
    for i, (label, value, caption) in enumerate(items):
        y = 4 + i * (bar + gap)
        short = label if len(label) <= 28 else label[:27] + "…"
        parts.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end" class="label">{escape(short)}</text>')
        parts.append(f'<rect class="bar mix" x="{left}" y="{y}" width="{max(plot_w * value / peak, 1):.1f}" '
                     f'height="{bar}" rx="3" fill="{PALETTE[i % len(PALETTE)]}"/>')  # fmt: skip
        parts.append(f'<text x="{left + plot_w + 8}" y="{y + 12}" class="label">{escape(caption)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def forecast_chart(forecast: Report, width: int = 640) -> str:
    """Month to date (solid), forecast (light) and the budget (a tick) per team."""
    rows = [r for r in forecast.rows if r["budget"] or r["forecast"]]
    left, bar, gap = 120, 18, 10
    peak = max([max(r["budget"], r["forecast"]) for r in rows] or [0]) or 1
    plot_w = width - left - 200
    height = len(rows) * (bar + gap) + 8
    parts = [f'<svg class="chart" id="forecast" viewBox="0 0 {width} {max(height, 30)}" role="img">']
    for i, r in enumerate(rows):
        y = 4 + i * (bar + gap)
        over = r["budget"] and r["forecast"] > r["budget"]
        parts.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end" class="label">{escape(r["team"])}</text>')
        parts.append(f'<rect class="bar forecast{" over" if over else ""}" x="{left}" y="{y}" '
                     f'width="{max(plot_w * r["forecast"] / peak, 1):.1f}" height="{bar}" rx="3"/>')  # fmt: skip
        parts.append(f'<rect class="bar actual" x="{left}" y="{y}" width="{max(plot_w * r["actual"] / peak, 1):.1f}" '
                     f'height="{bar}" rx="3"/>')  # fmt: skip
        if r["budget"]:
            x = left + plot_w * r["budget"] / peak
            parts.append(f'<line class="budget" x1="{x:.1f}" x2="{x:.1f}" y1="{y - 3}" y2="{y + bar + 3}"/>')
        parts.append(f'<text x="{left + plot_w + 8}" y="{y + 13}" class="label">{money(r["forecast"])} / '
                     f'{money(r["budget"]) if r["budget"] else "no budget"}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _when(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M} UTC"


DECISION_HEADERS = ["Scope", "Action", "Reason", "Spend", "Limit", "Expires", "Policy"]
STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f1f5f9;color:#0f172a}
header{background:#0f172a;color:#fff;padding:14px 24px;display:flex;justify-content:space-between;align-items:baseline}
header h1{margin:0;font-size:20px} header span{color:#94a3b8}
main{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px;padding:16px 24px}
section{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 2px #0002}
section h2{margin:0 0 8px;font-size:15px;color:#334155} h2 small{font-weight:normal;color:#64748b}
.kpis{grid-column:1/-1;display:flex;gap:16px}
.kpi{flex:1;background:#fff;border-radius:8px;padding:10px 16px;box-shadow:0 1px 2px #0002}
.kpi b{display:block;font-size:22px} .kpi small{color:#64748b}
svg.chart{width:100%;height:auto} .grid{stroke:#e2e8f0} .axis{font-size:11px;fill:#64748b}
.legend,.label{font-size:12px;fill:#0f172a} .threshold{stroke:#94a3b8;stroke-dasharray:4 3}
.bar.ok{fill:#10b981} .bar.warn{fill:#f59e0b} .bar.high{fill:#f97316} .bar.over{fill:#dc2626}
.bar.actual{fill:#2563eb} .bar.forecast{fill:#bfdbfe} .bar.forecast.over{fill:#fecaca}
.budget{stroke:#0f172a;stroke-width:3}
table{border-collapse:collapse;width:100%;font-size:12px}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #e2e8f0}
th{color:#475569} .empty{color:#64748b;font-style:italic}
"""


NOTIFICATION_HEADERS = ["When", "Kind", "Scope", "Channel", "For", "Status", "Attempts", "Last error"]


def render_page(
    *,
    now: datetime,
    trend: dict[str, dict[date, int]],
    trend_start: date,
    chargeback: Report,
    forecast: Report,
    mix: Report,
    decisions: list[dict[str, Any]],
    alerts: list[dict[str, Any]],
    policy_version: str = "",
    notifications: list[dict[str, Any]] | None = None,
) -> str:
    totals = chargeback.totals or {}
    ftotals = forecast.totals or {}
    budget, increase = totals.get("budget", 0), totals.get("increase", 0)
    of_budget = f"of {money(budget)} budget" + (f" (incl. +{money(increase)} approved increases)" if increase else "")
    kpis = [
        ("Spend this month", money(totals.get("actual", 0)), of_budget if budget else "no budget"),
        ("Budget used", fmt_pct(totals.get("utilisation")), "all departments" if budget else "no budget in the ledger"),
        ("Month-end forecast", money(ftotals.get("forecast", 0)), "at the 7-day run rate"),
        ("Active decisions", str(len(decisions)), f"{len(alerts)} recent alerts"),
    ]
    kpi_html = "".join(f'<div class="kpi"><small>{escape(a)}</small><b>{escape(b)}</b><small>{escape(c)}</small></div>'
                       for a, b, c in kpis)  # fmt: skip
    mix_items = [
        (r["model"], r["spend"], f"{money(r['spend'])} · {fmt_pct(r['spend_share'])} · {r['requests']:,} req")
        for r in mix.rows[:8]
    ]
    decision_rows = [
        [d["scope"], d["action"], d["reason"], money(d["spend"]), money(d["limit"]), _when(d["expires_at"]),
         d["policy"]]
        for d in decisions
    ]  # fmt: skip
    alert_rows = [[_when(a["occurred_at"]), a["severity"], a["scope"], a["message"]] for a in alerts]
    notification_rows = [
        [_when(n["created_at"]), n["kind"], n["scope"], n["channel"], ", ".join(n["audience"]), n["status"],
         str(n["attempts"]), n["last_error"]]
        for n in notifications or []
    ]  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spendstream · LLM spend</title>
<meta http-equiv="refresh" content="60"><style>{STYLE}</style></head>
<body><header><h1>spendstream · LLM spend</h1>
<span>{now:%Y-%m-%d %H:%M} UTC · {escape(chargeback.title)} ·
policy <span id="policy-version">{escape(policy_version) or "none loaded"}</span></span></header>
<main>
<div class="kpis">{kpi_html}</div>
<section><h2>Spend per day by team (last {(now.date() - trend_start).days + 1} days)</h2>
{trend_chart(trend, trend_start, now.date())}</section>
<section><h2>Budget used this month <small>(alert 80% · fallback 90% · shutoff 100%)</small></h2>
{utilisation_chart(chargeback)}</section>
<section><h2>Model mix this month</h2>{bars_chart("mix", mix_items)}</section>
<section><h2>Forecast vs budget</h2>{forecast_chart(forecast)}</section>
<section><h2>Active decisions</h2>
{_table(DECISION_HEADERS, decision_rows, "No restrictions in force.")}
</section>
<section><h2>Recent alerts</h2>{_table(["When", "Severity", "Scope", "Message"], alert_rows, "No alerts.")}</section>
<section><h2>Notifications</h2>
{_table(NOTIFICATION_HEADERS, notification_rows, "No notifications sent.")}</section>
</main></body></html>
"""
