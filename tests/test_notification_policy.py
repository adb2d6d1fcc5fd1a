"""The policy's notifications section and the pure parts of the notifier: validation with file:line, routing of
an alert to owners and escalation, schedules in the policy's timezone, payloads, signatures, redaction."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from spendstream.core.money_text import exact_usd_text
from spendstream.core.notification_policy import (
    NotificationKind,
    Recipient,
    last_occurrence,
    missing_secrets,
    notification_kind,
    recipients,
    report_period,
)
from spendstream.core.policy import PolicyError, load_policy, parse_policy, policy_from_json
from spendstream.notifier.messages import (
    alert_message,
    email_message,
    message_from_record,
    message_record,
    notification_id,
    redact,
    report_message,
    sign,
    slack_body,
    verify,
    webhook_body,
)

ROOT = Path(__file__).resolve().parents[1]
B = 1_000_000_000

BASE = """\
name: n
org: acme
divisions: {go_to_market: [marketing, sales], technology: [engineering]}
projects: {launch: marketing}
notifications:
  smtp: {host: 127.0.0.1, port: 2525, starttls: true, username: bot, password_env: SMTP_PASSWORD, sender: s@a.example}
  channels:
    cfo-mail: {kind: email, to: [cfo@acme.example]}
    vpe-mail: {kind: email, to: [vpe@acme.example]}
    mkt-slack: {kind: slack, url_env: MKT_SLACK_URL}
    mkt-hook: {kind: webhook, url: "https://hooks.acme.example/x", secret_env: HOOK_SECRET}
    gtm-mail: {kind: email, to: [gtm@acme.example]}
  people:
    cfo: [cfo-mail]
    vpe: [vpe-mail]
    mkt_lead: [mkt-slack, mkt-hook]
    gtm_head: [gtm-mail]
  scopes:
    "org:acme": {owners: [cfo]}
    "division:go_to_market": {owners: [gtm_head]}
    "team:marketing": {owners: [mkt_lead], channels: [gtm-mail]}
    "user:*": {owners: [gtm_head]}
  kinds:
    emergency_stop: {escalate: [cfo, vpe]}
    quota: {enabled: false}
    policy_rejected: {owners: false, escalate: [vpe]}
  reports:
    - {report: weekly, weekday: monday, at: "08:00", to: [cfo]}
    - {report: chargeback, day_of_month: 1, at: "07:30", to: [cfo, vpe]}
"""


def policy(text: str = BASE):  # type: ignore[no-untyped-def]
    return parse_policy(text, "n.yaml")


def route(kind: NotificationKind, scope: str) -> list[Recipient]:
    p = policy()
    assert p.notifications is not None
    return recipients(p.notifications, kind, scope, p.ancestors, p.org)


# -- validation ---------------------------------------------------------------------------------------------------


def problem_for(old: str, new: str) -> str:
    assert old in BASE
    with pytest.raises(PolicyError) as caught:
        policy(BASE.replace(old, new))
    return str(caught.value)


def test_a_secret_value_is_refused_and_errors_name_file_line_and_field() -> None:
    # a Slack URL is a credential: only the name of the variable that holds it may be in the policy
    text = problem_for("{kind: slack, url_env: MKT_SLACK_URL}", "{kind: slack, url: https://hooks.slack.com/T/B/x}")
    assert "n.yaml:10: notifications.channels.mkt-slack.slack.url: unknown field 'url' (did you mean url_env?)" in text
    text = problem_for("password_env: SMTP_PASSWORD", "password_env: hunter2-secret!")
    assert "n.yaml:6: notifications.smtp.password_env: expected the NAME of an environment variable" in text
    text = problem_for('url: "https://hooks.acme.example/x"', 'url: "https://user:pw@hooks.acme.example/x"')
    assert "n.yaml:11: notifications.channels.mkt-hook.webhook: url must not carry credentials" in text
    text = problem_for("secret_env: HOOK_SECRET", "secret: abc")
    assert "notifications.channels.mkt-hook.webhook.secret_env: Field required" in text


def test_references_kinds_and_schedules_are_checked() -> None:
    text = problem_for("[mkt-slack, mkt-hook]", "[mkt-slack, nope]")
    assert text == "n.yaml:14: notifications.people: mkt_lead: unknown channel 'nope'"  # reported once, where made
    assert problem_for("escalate: [cfo, vpe]}", "escalate: [cfo, ceo]}") == (
        "n.yaml:24: notifications.kinds: emergency_stop.escalate: unknown person 'ceo'"
    )
    assert problem_for("to: [cfo]}", "to: [ceo]}") == "n.yaml:28: notifications.reports: 0.to: unknown person 'ceo'"
    assert "n.yaml:25: notifications.kinds.outage" in problem_for("quota: {enabled: false}", "outage: {}")
    assert "a weekly report needs weekday" in problem_for("weekday: monday, ", "")
    assert "day_of_month" in problem_for("day_of_month: 1", "day_of_month: 31")
    assert "n.yaml:19: notifications.scopes" in problem_for('"user:*"', '"person:bob"')
    assert problem_for(BASE.splitlines()[5], "") == (
        "n.yaml:8: notifications.channels: e-mail channels (cfo-mail, gtm-mail, vpe-mail) need an smtp relay "
        "(notifications.smtp)"
    )


def test_section_is_optional_and_survives_the_policy_topic_round_trip() -> None:
    bare = parse_policy("name: n\n", "n.yaml")
    assert "notifications" not in bare.to_json()  # a policy without it keeps its version
    full = policy()
    assert policy_from_json(full.to_json()).version == full.version
    assert "SMTP_PASSWORD" in full.to_json() and "hunter2" not in full.to_json()


def test_missing_secrets_name_their_field() -> None:
    n = policy().notifications
    assert n is not None
    assert missing_secrets(n, {"SMTP_PASSWORD": "x", "MKT_SLACK_URL": "https://x", "HOOK_SECRET": "s"}) == []
    assert missing_secrets(n, {"SMTP_PASSWORD": "x", "HOOK_SECRET": ""}) == [
        "notifications.channels.mkt-slack.url_env: environment variable MKT_SLACK_URL is not set",
        "notifications.channels.mkt-hook.secret_env: environment variable HOOK_SECRET is not set",
    ]


def test_the_reference_policy_names_owners_and_escalates_an_emergency_stop() -> None:
    reference = load_policy(ROOT / "infra/policy/default.yaml")
    n = reference.notifications
    assert n is not None
    marketing = recipients(n, NotificationKind.threshold, "team:marketing", reference.ancestors, reference.org)
    assert marketing == [Recipient("marketing-mail", ("marketing_lead",))]
    stop = recipients(n, NotificationKind.emergency_stop, "feature:ai_code_review", reference.ancestors, reference.org)
    assert {r.audience for r in stop} >= {("cfo",), ("vp_engineering",)}


# -- routing ------------------------------------------------------------------------------------------------------


def test_owners_and_scope_channels_of_the_scope_itself() -> None:
    assert route(NotificationKind.threshold, "team:marketing") == [
        Recipient("mkt-slack", ("mkt_lead",)),
        Recipient("mkt-hook", ("mkt_lead",)),
        Recipient("gtm-mail", ("team:marketing",)),
    ]


def test_a_scope_without_owners_falls_back_up_the_hierarchy() -> None:
    assert route(NotificationKind.threshold, "team:sales") == [Recipient("gtm-mail", ("gtm_head",))]
    assert route(NotificationKind.forecast, "project:launch") == route(NotificationKind.forecast, "team:marketing")
    assert route(NotificationKind.threshold, "team:engineering") == [Recipient("cfo-mail", ("cfo",))]
    assert route(NotificationKind.spike, "feature:anything") == [Recipient("cfo-mail", ("cfo",))]
    assert route(NotificationKind.threshold, "user:bob") == [Recipient("gtm-mail", ("gtm_head",))]  # template
    assert route(NotificationKind.threshold, "customer:c1") == []  # no owner, and customers do not reach the org


def test_escalation_adds_people_at_once_and_each_channel_is_notified_once() -> None:
    found = route(NotificationKind.emergency_stop, "feature:ai_code_review")
    assert found == [Recipient("cfo-mail", ("cfo",)), Recipient("vpe-mail", ("vpe",))]  # the org owner is the cfo
    assert route(NotificationKind.policy_rejected, "policy:n") == [Recipient("vpe-mail", ("vpe",))]
    assert route(NotificationKind.quota, "user:bob") == []


def test_alert_kinds_map_to_notification_kinds() -> None:
    assert notification_kind("spike", "critical") is NotificationKind.emergency_stop
    assert notification_kind("spike", "warning") is NotificationKind.spike
    assert notification_kind("policy", "critical") is NotificationKind.policy_rejected
    assert notification_kind("threshold", "warning") is NotificationKind.threshold


# -- schedules ----------------------------------------------------------------------------------------------------


def test_schedules_follow_the_policy_timezone() -> None:
    weekly, chargeback = policy().notifications.reports  # type: ignore[union-attr]
    berlin = ZoneInfo("Europe/Berlin")
    # Monday 2026-03-16 07:30 UTC is 08:30 in Berlin: this Monday's 08:00 has passed there
    assert last_occurrence(weekly, datetime(2026, 3, 16, 7, 30, tzinfo=UTC), berlin) == datetime(
        2026, 3, 16, 8, 0, tzinfo=berlin
    )
    # 06:30 UTC is 07:30 in Berlin: not yet, so the previous Monday
    assert last_occurrence(weekly, datetime(2026, 3, 16, 6, 30, tzinfo=UTC), berlin) == datetime(
        2026, 3, 9, 8, 0, tzinfo=berlin
    )
    assert report_period(weekly, datetime(2026, 3, 16, 8, 0, tzinfo=berlin)).isoformat() == "2026-03-09"
    assert last_occurrence(chargeback, datetime(2026, 3, 1, 6, 0, tzinfo=UTC), berlin) == datetime(
        2026, 2, 1, 7, 30, tzinfo=berlin
    )
    january = last_occurrence(chargeback, datetime(2026, 1, 1, 6, 31, tzinfo=UTC), berlin)
    assert january == datetime(2026, 1, 1, 7, 30, tzinfo=berlin)
    assert report_period(chargeback, january).isoformat() == "2025-12-01"


# -- messages and payloads ----------------------------------------------------------------------------------------

ALERT = {
    "alert_id": "7d4c2a52-7f4e-4a39-9d3b-2f0c2b1f7a10",
    "scope": "team:marketing",
    "kind": "threshold",
    "severity": "warning",
    "message": "alert: team:marketing at 80% of its month budget",
    "spend_nanos": 6_400 * B + 750,
    "limit_nanos": 8_000 * B,
    "period": "month",
    "occurred_at": datetime(2026, 3, 16, 9, 0, tzinfo=UTC),
}


def test_exact_dollars() -> None:
    assert exact_usd_text(6_400 * B) == "$6,400.00"
    assert exact_usd_text(750) == "$0.00000075"
    assert exact_usd_text(-1_500_000_000) == "-$1.50"
    assert exact_usd_text(1_234_567_890_123) == "$1,234.567890123"


def test_an_alert_says_what_happened_spend_limit_what_edges_do_and_how_to_act() -> None:
    message = alert_message(ALERT, NotificationKind.threshold, None, "http://dash.example/")
    text = message.text()
    assert "alert: team:marketing at 80%" in text
    assert "Spend: $6,400.00000075 of a $8,000.00 limit (80.0%)" in text
    assert "Edges now: requests pass unchanged (alert only)" in text
    assert "spendstream budget request" in text and "http://dash.example/" in text
    after_shutoff = alert_message(ALERT, NotificationKind.threshold, "shutoff", None)
    assert "requests are refused" in after_shutoff.edges
    # a fallback alert read before its decision, the scope's newest still a hard cap's standing (an allow)
    fallback = alert_message({**ALERT, "message": "fallback: team:growth at 90%"}, NotificationKind.threshold, "allow",
                             None)  # fmt: skip
    assert "routed to their cheaper fallback" in fallback.edges
    assert "--period" not in text  # a month budget: the command's default
    daily = alert_message({**ALERT, "period": "day"}, NotificationKind.threshold, None, None)
    assert "spendstream budget request team:marketing AMOUNT --period day --until" in daily.text()
    stop = alert_message(
        {**ALERT, "kind": "spike", "severity": "critical"}, NotificationKind.emergency_stop, None, None
    )
    assert stop.title.startswith("[spendstream] EMERGENCY STOP") and "emergency stop" in stop.edges
    assert stop.spend_nanos is None  # a spike's limit is its baseline, stated in its message
    assert message_from_record(message_record(message)) == message


def test_webhook_body_signature_and_verification_recipe() -> None:
    message = alert_message(ALERT, NotificationKind.threshold, "alert", None)
    nid = notification_id(message.source_id, "mkt-hook")
    assert nid == notification_id(f"alert:{ALERT['alert_id']}", "mkt-hook") != notification_id(message.source_id, "x")
    body = webhook_body(message, nid, "mkt-hook", ("mkt_lead",))
    doc = json.loads(body)
    assert (doc["notification_id"], doc["spend_nanos"], doc["spend_usd"]) == (nid, 6_400 * B + 750, "6400.000000750")
    assert doc["limit_usd"] == "8000.000000000" and doc["audience"] == ["mkt_lead"]
    signature = sign("s3cret", 1_773_651_600, body)
    expected = hmac.new(b"s3cret", b"1773651600." + body, hashlib.sha256).hexdigest()
    assert signature == f"v1={expected}"
    assert verify("s3cret", "1773651600", body, signature, now=1_773_651_700)
    assert not verify("s3cret", "1773651600", body + b" ", signature, now=1_773_651_700)  # body changed
    assert not verify("other", "1773651600", body, signature, now=1_773_651_700)  # wrong secret
    assert not verify("s3cret", "1773651600", body, signature, now=1_773_651_600 + 301)  # a replay, too late
    assert not verify("s3cret", "1773651601", body, signature, now=1_773_651_700)  # timestamp changed
    assert not verify("s3cret", "soon", body, signature, now=1_773_651_700)


def test_slack_and_email_renderings() -> None:
    message = alert_message({**ALERT, "message": "alert: <team> & co"}, NotificationKind.threshold, None, None)
    slack = json.loads(slack_body(message, ("mkt_lead",)))
    assert slack["text"].startswith("*[spendstream] budget threshold: team:marketing*")
    assert "&lt;team&gt; &amp; co" in slack["text"] and "For: mkt_lead" in slack["text"]
    assert [b["type"] for b in slack["blocks"]] == ["header", "section"]
    at = ALERT["occurred_at"]
    report = report_message("report:w:1", "CFO weekly", ["Spend: $1.00"], "w.csv", "week,spend_usd\n", None, at)
    mail = email_message(report, "abc123", "s@acme.example", ["cfo@acme.example"], ALERT["occurred_at"])
    parsed = message_from_bytes(mail.as_bytes(), policy=email_policy.default)
    assert parsed["Message-ID"] == "<abc123@spendstream>" and parsed["To"] == "cfo@acme.example"
    parts = list(parsed.iter_attachments())
    assert [(p.get_filename(), p.get_content_type()) for p in parts] == [("w.csv", "text/csv")]
    assert parts[0].get_payload(decode=True) == b"week,spend_usd\n"


def test_redaction_removes_secret_values() -> None:
    assert redact("POST https://hooks.slack.com/T1/B2/tok3n failed", ["https://hooks.slack.com/T1/B2/tok3n"]) == (
        "POST [secret] failed"
    )
    assert redact("nothing here", ["", "ab"]) == "nothing here"
