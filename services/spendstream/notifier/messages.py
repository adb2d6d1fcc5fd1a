"""What a notification says and how each channel carries it: pure functions, no I/O.

A ``Message`` is channel-agnostic (what happened, the spend and the limit in exact dollars, what the edges now
do, how to act); ``webhook_body``, ``slack_body`` and ``email_message`` render it for a channel. Webhook bodies
are signed with HMAC-SHA256 over ``timestamp.body`` (``sign``; receivers check with ``verify``, see
docs/architecture.md §12). Every delivery of one notification to one channel carries the same idempotency key
(``notification_id``), so a receiver that sees a retry can drop it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from spendstream.core.events import NANOS_PER_USD
from spendstream.core.money_text import exact_usd_text
from spendstream.core.notification_policy import NotificationKind

SIGNATURE_HEADER = "X-Spendstream-Signature"
TIMESTAMP_HEADER = "X-Spendstream-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_TOLERANCE_S = 300  # a receiver refuses a signature older (or newer) than this


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str  # e.g. text/csv
    text: str


@dataclass(frozen=True)
class Message:
    """One notification's content, before a channel shapes it."""

    source_id: str  # the alert id, or the scheduled report's occurrence
    kind: NotificationKind
    scope: str
    severity: str
    title: str
    happened: str
    spend_nanos: int | None = None
    limit_nanos: int | None = None
    edges: str = ""  # what the edges now do
    act: str = ""  # the link or command to act on it
    occurred_at: datetime | None = None
    attachments: tuple[Attachment, ...] = ()
    summary_lines: tuple[str, ...] = ()  # e.g. a report's rows, for chat channels

    def text(self) -> str:
        lines = [self.happened]
        if self.spend_nanos is not None:
            limit = f" of a {exact_usd_text(self.limit_nanos)} limit" if self.limit_nanos else ""
            share = _share(self.spend_nanos, self.limit_nanos)
            lines.append(f"Spend: {exact_usd_text(self.spend_nanos)}{limit}{share}")
        lines += list(self.summary_lines)
        if self.edges:
            lines.append(f"Edges now: {self.edges}")
        if self.act:
            lines.append(f"Act: {self.act}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "kind": str(self.kind),
            "scope": self.scope,
            "severity": self.severity,
            "title": self.title,
            "happened": self.happened,
            "spend_nanos": self.spend_nanos,
            "spend_usd": None if self.spend_nanos is None else _plain_usd(self.spend_nanos),
            "limit_nanos": self.limit_nanos,
            "limit_usd": None if self.limit_nanos is None else _plain_usd(self.limit_nanos),
            "edges": self.edges,
            "act": self.act,
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
            "summary": list(self.summary_lines),
            "attachments": [{"filename": a.filename, "content_type": a.content_type} for a in self.attachments],
        }


def message_record(message: Message) -> str:
    """The whole message as JSON (attachments included): what the ledger keeps to deliver it after a restart."""
    document = asdict(message)
    document["occurred_at"] = message.occurred_at.isoformat() if message.occurred_at else None
    return json.dumps(document, sort_keys=True)


def message_from_record(text: str) -> Message:
    document = json.loads(text)
    document["kind"] = NotificationKind(document["kind"])
    document["attachments"] = tuple(Attachment(**a) for a in document["attachments"])
    document["summary_lines"] = tuple(document["summary_lines"])
    if document["occurred_at"]:
        document["occurred_at"] = datetime.fromisoformat(document["occurred_at"])
    return Message(**document)


def _plain_usd(nanos: int) -> str:
    return f"{Decimal(nanos) / NANOS_PER_USD:.9f}"


def _share(spend: int, limit: int | None) -> str:
    if not limit:
        return ""
    percent = (Decimal(spend) * 100 / limit).quantize(Decimal("0.1"))
    return f" ({percent}%)"


def notification_id(source_id: str, channel: str) -> str:
    """The idempotency key of one notification on one channel: the same for every retry and every restart."""
    return hashlib.sha256(f"{source_id}|{channel}".encode()).hexdigest()[:32]


# -- alerts -----------------------------------------------------------------------------------------------------

_ACTION_EFFECT = {
    "alert": "requests pass unchanged (alert only)",
    "fallback": "requests for expensive models are routed to their cheaper fallback",
    "throttle": "requests are throttled",
    "shutoff": "requests are refused (critical features are throttled instead, unless the budget is a hard cap)",
    "allow": "requests pass unchanged",
}


def edge_effect(kind: NotificationKind, message: str, decision_action: str | None) -> str:
    """What the edges do after the alert: the action of the scope's newest decision when known, else the action
    the alert itself names (threshold alerts start with it, an emergency stop is a shutoff)."""
    if kind is NotificationKind.emergency_stop:
        return (
            "the feature's requests are refused until the spike window ends (emergency stop; critical features "
            "are exempt)"
        )
    action = decision_action
    if action in (None, "allow") and kind is NotificationKind.threshold:
        # the alert's own action: the scope's newest decision may still be the one before it (a hard cap's
        # standing is an allow), since alerts and decisions arrive on two topics
        action = message.partition(":")[0].strip()
    if action in _ACTION_EFFECT:
        return _ACTION_EFFECT[action]
    if kind is NotificationKind.policy_rejected:
        return "the previous policy stays in force"
    if kind is NotificationKind.pipeline_unhealthy:
        return "edges keep applying the last decisions they received (fail-open unless configured fail-closed)"
    return "requests pass unchanged"


def act_hint(kind: NotificationKind, scope: str, dashboard_url: str | None, period: str = "") -> str:
    """The command (and link) that lets the recipient act (a budget request names the budget's period unless it is
    the month, the command's default)."""
    if kind is NotificationKind.policy_rejected:
        command = (
            "fix the policy file and run `spendstream policy apply FILE` (`spendstream policy show` shows what is "
            "in force)"
        )
    elif kind is NotificationKind.pipeline_unhealthy:
        command = "check the processors (`spendstream dev` log or `docker compose ps processor`)"
    else:
        by = "user" if scope.startswith("feature:") else "feature"
        command = f"see where the spend goes with `spendstream report top --by {by}`"
        if kind in (NotificationKind.threshold, NotificationKind.forecast):
            command += (
                f"; ask for more with `spendstream budget request {scope} AMOUNT"
                f"{f' --period {period}' if period and period != 'month' else ''} --until YYYY-MM-DD --reason WHY` "
                "(`--overage` once it is spent; an approver grants it with `spendstream budget approve ID`)"
            )
        elif kind is NotificationKind.quota:
            command += f"; raise the {scope} quota in the policy and run `spendstream policy apply FILE`"
    return f"{command}; dashboard: {dashboard_url}" if dashboard_url else command


_TITLES = {
    NotificationKind.threshold: "budget threshold",
    NotificationKind.spike: "spend spike",
    NotificationKind.emergency_stop: "EMERGENCY STOP",
    NotificationKind.forecast: "budget forecast",
    NotificationKind.quota: "quota reached",
    NotificationKind.policy_rejected: "policy rejected",
    NotificationKind.pipeline_unhealthy: "pipeline unhealthy",
}


def alert_message(
    alert: dict[str, Any], kind: NotificationKind, decision_action: str | None, dashboard_url: str | None
) -> Message:
    """The message for one decoded Alert record (``spendstream.alerts``)."""
    spend, limit = int(alert.get("spend_nanos") or 0), int(alert.get("limit_nanos") or 0)
    # budgets have a spend and a limit; a spike's "limit" is its baseline, which its message states
    has_money = kind in (NotificationKind.threshold, NotificationKind.forecast)
    return Message(
        source_id=f"alert:{alert['alert_id']}",
        kind=kind,
        scope=alert["scope"],
        severity=str(alert.get("severity") or "warning"),
        title=f"[spendstream] {_TITLES[kind]}: {alert['scope']}",
        happened=str(alert["message"]),
        spend_nanos=spend if has_money else None,
        limit_nanos=limit if has_money and limit else None,
        edges=edge_effect(kind, str(alert["message"]), decision_action),
        act=act_hint(kind, alert["scope"], dashboard_url, str(alert.get("period") or "")),
        occurred_at=alert.get("occurred_at"),
    )


def pipeline_message(worker: str, last_seen: datetime, now: datetime, dashboard_url: str | None) -> Message:
    """No processor heartbeat since ``last_seen``: decisions are no longer being made."""
    silent = int((now - last_seen).total_seconds())
    return Message(
        source_id=f"pipeline:{worker}:{last_seen.isoformat()}",
        kind=NotificationKind.pipeline_unhealthy,
        scope="pipeline:processor",
        severity="critical",
        title="[spendstream] pipeline unhealthy: no processor heartbeat",
        happened=f"no processor heartbeat for {silent} s (last from {worker} at {last_seen.isoformat()})",
        edges=edge_effect(NotificationKind.pipeline_unhealthy, "", None),
        act=act_hint(NotificationKind.pipeline_unhealthy, "", dashboard_url),
        occurred_at=now,
    )


# -- reports ----------------------------------------------------------------------------------------------------


def report_message(
    source_id: str, title: str, summary: Iterable[str], csv_name: str, csv_text: str, dashboard_url: str | None,
    occurred_at: datetime, command: str = "spendstream report",
) -> Message:  # fmt: skip
    """A scheduled report: its headline figures as text, the whole report as a CSV attachment; ``command`` prints
    the same report again."""
    link = f"; dashboard: {dashboard_url}" if dashboard_url else ""
    return Message(
        source_id=source_id,
        kind=NotificationKind.report,
        scope="report",
        severity="info",
        title=f"[spendstream] {title}",
        happened=title,
        summary_lines=tuple(summary),
        act=f"the full report is attached ({csv_name}); `{command}` prints it again{link}",
        occurred_at=occurred_at,
        attachments=(Attachment(csv_name, "text/csv", csv_text),),
    )


# -- channel payloads -------------------------------------------------------------------------------------------


def webhook_body(message: Message, notification: str, channel: str, audience: tuple[str, ...]) -> bytes:
    """The JSON a generic webhook receives (attachments inline, so a receiver needs nothing else)."""
    document = {
        "notification_id": notification,
        "channel": channel,
        "audience": list(audience),
        "text": message.text(),
        **message.to_json(),
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "content": a.text} for a in message.attachments
        ],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def slack_body(message: Message, audience: tuple[str, ...]) -> bytes:
    """Slack incoming-webhook JSON: ``text`` (the fallback and the notification) and mrkdwn blocks."""
    heading = f"*{_escape_slack(message.title)}*"
    who = f"\nFor: {', '.join(audience)}" if audience else ""
    text = f"{heading}\n{_escape_slack(message.text())}{who}"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": message.title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _escape_slack(message.text())[:3000]}},
    ]
    return json.dumps({"text": text, "blocks": blocks}, separators=(",", ":")).encode()


def _escape_slack(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def email_message(
    message: Message, notification: str, sender: str, to: list[str], now: datetime, domain: str = "spendstream"
) -> EmailMessage:
    """The e-mail: text body, CSV attachments, and a Message-ID derived from the idempotency key."""
    mail = EmailMessage()
    mail["Subject"] = message.title
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    mail["Date"] = format_datetime(now)
    mail["Message-ID"] = f"<{notification}@{domain}>"
    mail["X-Spendstream-Notification"] = notification
    mail.set_content(message.text() + "\n")
    for attachment in message.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        mail.add_attachment(attachment.text.encode(), maintype=maintype, subtype=subtype, filename=attachment.filename)
    return mail


# -- signatures -------------------------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=`` + hex HMAC-SHA256 of ``{timestamp}.{body}`` under the channel's secret."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(
    secret: str, timestamp_header: str, body: bytes, signature_header: str, now: float,
    tolerance_s: int = SIGNATURE_TOLERANCE_S,
) -> bool:  # fmt: skip
    """What a receiver runs: the timestamp is recent (a captured request cannot be replayed later) and the
    signature matches (constant-time). Pair it with a store of seen ``Idempotency-Key`` values."""
    try:
        timestamp = int(timestamp_header)
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, part.strip()) for part in signature_header.split(","))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced, for errors that may quote a URL or a server's reply."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[secret]")
    return text


@dataclass
class Delivery:
    """The state of one notification on one channel, as the ``notifications`` table records it."""

    notification_id: str
    source_id: str
    kind: str
    scope: str
    channel: str
    channel_kind: str
    audience: tuple[str, ...]
    title: str
    payload: str  # the Message as JSON, so a restart can deliver it again without its source
    status: str = "pending"  # pending -> sent | failed (retrying) -> dead_letter
    attempts: int = 0
    last_error: str = ""
    created_at: datetime | None = None
    sent_at: datetime | None = None
    next_attempt_at: datetime | None = None
