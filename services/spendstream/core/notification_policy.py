"""Who hears about what: the ``notifications:`` section of the policy, and the pure routing and scheduling over it.

The section names channels (a signed webhook, a Slack incoming webhook, e-mail over SMTP), people (each with
their channels), the owners and channels of scopes (``team:marketing``, ``division:go_to_market``,
``feature:ai_chatbot``, ``org:acme``), what each kind of notification does (notify owners, escalate to named
people) and the scheduled reports. Secrets are never values in the policy (which travels on
``spendstream.policy``): a channel names the environment variable that holds its secret (``secret_env``,
``url_env``, ``password_env``), read by the notifier alone.

API: ``Notifications`` (the pydantic section), ``notification_kind(alert kind, severity)``,
``recipients(notifications, kind, scope, ancestors) -> list[Recipient]``, ``missing_secrets(notifications, env)``,
``last_occurrence(schedule, now, tz)`` and ``report_period(schedule, occurrence)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from spendstream.core.attribution import check_scope

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


class NotificationKind(StrEnum):
    """What happened; each kind has its own routing (``notifications.kinds``)."""

    threshold = "threshold"  # a budget crossed its alert, fallback or shutoff threshold
    spike = "spike"  # a spike rule fired and only alerts
    emergency_stop = "emergency_stop"  # a spike rule stopped a non-critical feature
    forecast = "forecast"  # a budget is on course to be exceeded
    quota = "quota"  # a per-user/day quota was reached
    policy_rejected = "policy_rejected"  # a published policy was refused; the previous one stays in force
    pipeline_unhealthy = "pipeline_unhealthy"  # the processors stopped reporting
    report = "report"  # a scheduled report


def notification_kind(alert_kind: str, severity: str) -> NotificationKind:
    """The notification kind of an Alert: a critical spike is an emergency stop, a ``policy`` alert a rejection."""
    if alert_kind == "spike":
        return NotificationKind.emergency_stop if severity == "critical" else NotificationKind.spike
    if alert_kind == "policy":
        return NotificationKind.policy_rejected
    return NotificationKind(alert_kind)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(f"expected the NAME of an environment variable holding the secret, got {value!r}")
    return value


EnvName = Annotated[str, Field(min_length=1)]


class Smtp(_Model):
    """An SMTP relay; the password is read from the environment variable ``password_env`` by the notifier."""

    host: str = Field(min_length=1)
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password_env: EnvName | None = None
    sender: str = Field(min_length=3)  # the From address

    _env = field_validator("password_env")(_env_name)

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        if not _EMAIL.match(value.rsplit("<", 1)[-1].rstrip(">")):
            raise ValueError(f"expected an e-mail address, got {value!r}")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> Smtp:
        if (self.username is None) != (self.password_env is None):
            raise ValueError("give username and password_env together (or neither, for a relay without login)")
        return self


class WebhookChannel(_Model):
    """A JSON POST signed with HMAC-SHA256 over ``timestamp.body`` (the secret from ``secret_env``)."""

    kind: Literal["webhook"]
    url: str | None = None
    url_env: EnvName | None = None
    secret_env: EnvName

    _env = field_validator("url_env", "secret_env")(_env_name)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookChannel:
        _check_url(self.url, self.url_env)
        return self


class SlackChannel(_Model):
    """A Slack incoming webhook; its URL is a credential, so only ``url_env`` may name it."""

    kind: Literal["slack"]
    url_env: EnvName

    _env = field_validator("url_env")(_env_name)


class EmailChannel(_Model):
    kind: Literal["email"]
    to: list[str] = Field(min_length=1)

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if not _EMAIL.match(address):
                raise ValueError(f"expected e-mail addresses, got {address!r}")
        return value


def _check_url(url: str | None, url_env: str | None) -> None:
    if (url is None) == (url_env is None):
        raise ValueError("give url or url_env (the name of an environment variable holding it), exactly one")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    if url is not None and re.search(r"//[^/]*@", url):
        raise ValueError("url must not carry credentials; put the whole URL in an environment variable (url_env)")


Channel = Annotated[WebhookChannel | SlackChannel | EmailChannel, Field(discriminator="kind")]


class ScopeContacts(_Model):
    """Who owns a scope: people (by name) and channels notified directly."""

    owners: list[str] = Field(default_factory=list)
    channels: list[str] = Field(default_factory=list)


class KindRoute(_Model):
    """What a kind does: notify the scope's owners (the nearest scope up the hierarchy that names any) and
    escalate at once to the people listed; ``enabled: false`` silences the kind."""

    enabled: bool = True
    owners: bool = True
    escalate: list[str] = Field(default_factory=list)


class Retry(_Model):
    """Exponential backoff per notification: ``first_backoff_s * 2**(attempt-1)`` capped at ``max_backoff_s``;
    after ``max_attempts`` failed attempts the notification becomes a dead letter."""

    max_attempts: int = Field(6, ge=1, le=100)
    first_backoff_s: float = Field(1.0, gt=0, le=3600)
    max_backoff_s: float = Field(300.0, gt=0, le=86_400)
    timeout_s: float = Field(10.0, gt=0, le=300)

    def backoff_s(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1, 2, ...)."""
        return min(self.first_backoff_s * 2 ** max(attempts - 1, 0), self.max_backoff_s)


class ReportSchedule(_Model):
    """A report delivered on a schedule in the policy's timezone: ``weekly`` (the CFO report of the week before)
    on ``weekday`` at ``at``; ``chargeback`` (the month before) on ``day_of_month`` at ``at``."""

    report: Literal["weekly", "chargeback"]
    to: list[str] = Field(min_length=1)  # people
    at: time = time(8, 0)
    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] | None = None
    day_of_month: int | None = Field(None, ge=1, le=28)

    @model_validator(mode="after")
    def _when(self) -> ReportSchedule:
        if self.report == "weekly" and (self.weekday is None or self.day_of_month is not None):
            raise ValueError("a weekly report needs weekday (and no day_of_month)")
        if self.report == "chargeback" and (self.day_of_month is None or self.weekday is not None):
            raise ValueError("a chargeback report needs day_of_month, 1..28 (and no weekday)")
        return self

    @property
    def id(self) -> str:
        return f"{self.report}@{self.weekday or self.day_of_month}@{self.at:%H:%M}"


class Notifications(_Model):
    """The ``notifications:`` section of a policy."""

    dashboard_url: str | None = None  # the link a notification carries
    smtp: Smtp | None = None
    channels: dict[str, Channel] = Field(default_factory=dict)
    people: dict[str, list[str]] = Field(default_factory=dict)  # person -> channel names
    scopes: dict[str, ScopeContacts] = Field(default_factory=dict)  # scope -> owners and channels
    kinds: dict[NotificationKind, KindRoute] = Field(default_factory=dict)
    retry: Retry = Field(default_factory=Retry)
    reports: list[ReportSchedule] = Field(default_factory=list)

    @field_validator("channels", "people")
    @classmethod
    def _names(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: names are letters, digits, '_', '.', '-'")
        return value

    # Each reference is checked on the field that makes it (earlier fields are in ``info.data``, absent when they
    # failed themselves), so an error names that field and its line, and one mistake is reported once.

    @field_validator("channels")
    @classmethod
    def _email_needs_smtp(cls, value: dict[str, Channel], info: ValidationInfo) -> dict[str, Channel]:
        email = sorted(name for name, channel in value.items() if channel.kind == "email")
        if email and info.data.get("smtp") is None:
            raise ValueError(f"e-mail channels ({', '.join(email)}) need an smtp relay (notifications.smtp)")
        return value

    @field_validator("people")
    @classmethod
    def _people_channels(cls, value: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        if "channels" not in info.data:
            return value  # the channels themselves are wrong; that is the error to show
        channels = info.data["channels"]
        _refuse(
            [f"{person}: unknown channel {n!r}" for person, names in value.items() for n in names if n not in channels]
        )
        return value

    @field_validator("scopes")
    @classmethod
    def _scope_contacts(cls, value: dict[str, ScopeContacts], info: ValidationInfo) -> dict[str, ScopeContacts]:
        for scope in value:
            check_scope(scope)
        if "people" not in info.data or "channels" not in info.data:
            return value
        people, channels = info.data["people"], info.data["channels"]
        problems = []
        for scope, contacts in value.items():
            problems += [f"{scope}.owners: unknown person {p!r}" for p in contacts.owners if p not in people]
            problems += [f"{scope}.channels: unknown channel {n!r}" for n in contacts.channels if n not in channels]
        _refuse(problems)
        return value

    @field_validator("kinds")
    @classmethod
    def _escalation(cls, value: dict[NotificationKind, KindRoute], info: ValidationInfo) -> dict:
        if "people" not in info.data:
            return value
        people = info.data["people"]
        _refuse(
            [f"{k}.escalate: unknown person {p!r}" for k, r in value.items() for p in r.escalate if p not in people]
        )
        return value

    @field_validator("reports")
    @classmethod
    def _report_people(cls, value: list[ReportSchedule], info: ValidationInfo) -> list[ReportSchedule]:
        if "people" not in info.data:
            return value
        people = info.data["people"]
        _refuse([f"{i}.to: unknown person {p!r}" for i, r in enumerate(value) for p in r.to if p not in people])
        return value

    def route(self, kind: NotificationKind) -> KindRoute:
        return self.kinds.get(kind) or _DEFAULT_ROUTE


_DEFAULT_ROUTE = KindRoute()


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Recipient:
    """One channel to deliver to, and for whom (people's names, or the scope whose channel it is)."""

    channel: str
    audience: tuple[str, ...]


# Dimensions whose notifications fall back to the organisation's owners when the scope names none.
_ORG_FALLBACK = ("org", "division", "team", "project", "feature")


def owner_scopes(scope: str, ancestors: Mapping[str, tuple[str, ...]], org: str) -> list[str]:
    """Where to look for a scope's owners, nearest first: the scope, its ``dimension:*`` template, the scopes
    above it (team -> division -> org), and for hierarchy and feature scopes finally the organisation."""
    dimension = scope.partition(":")[0]
    chain = [scope, f"{dimension}:*", *ancestors.get(scope, ())]
    if dimension in _ORG_FALLBACK and org:
        chain.append(f"org:{org}")
    return list(dict.fromkeys(chain))


def recipients(
    notifications: Notifications,
    kind: NotificationKind,
    scope: str,
    ancestors: Mapping[str, tuple[str, ...]],
    org: str = "",
    people: list[str] | None = None,
) -> list[Recipient]:
    """The channels a notification of ``kind`` about ``scope`` goes to: the owners and channels of the nearest
    scope that names any (if the kind notifies owners), plus the kind's escalation (or ``people`` when given,
    for reports). Each channel once, with everyone it is for, in a stable order."""
    route = notifications.route(kind)
    if not route.enabled:
        return []
    audience: dict[str, list[str]] = {}

    def add(channel: str, who: str) -> None:
        listed = audience.setdefault(channel, [])
        if who not in listed:
            listed.append(who)

    if people is None and route.owners:
        for candidate in owner_scopes(scope, ancestors, org):
            contacts = notifications.scopes.get(candidate)
            if contacts is None or not (contacts.owners or contacts.channels):
                continue
            for person in contacts.owners:
                for channel in notifications.people.get(person, []):
                    add(channel, person)
            for channel in contacts.channels:
                add(channel, candidate)
            break
    for person in people if people is not None else route.escalate:
        for channel in notifications.people.get(person, []):
            add(channel, person)
    return [Recipient(channel, tuple(who)) for channel, who in audience.items()]


def secret_references(notifications: Notifications) -> list[tuple[str, str]]:
    """Every ``(field, environment variable)`` the notifier reads a secret or secret URL from."""
    found = []
    if notifications.smtp is not None and notifications.smtp.password_env:
        found.append(("notifications.smtp.password_env", notifications.smtp.password_env))
    for name, channel in notifications.channels.items():
        for attribute in ("url_env", "secret_env"):
            env = getattr(channel, attribute, None)
            if env:
                found.append((f"notifications.channels.{name}.{attribute}", env))
    return found


def missing_secrets(notifications: Notifications, env: Mapping[str, str]) -> list[str]:
    """``field: ...`` for every secret the environment does not hold (the notifier refuses to start on any)."""
    return [
        f"{field}: environment variable {name} is not set" for field, name in secret_references(notifications)
        if not env.get(name)
    ]  # fmt: skip


# -- schedules --------------------------------------------------------------------------------------------------


def last_occurrence(schedule: ReportSchedule, now: datetime, tz: tzinfo) -> datetime:
    """The latest scheduled instant at or before ``now`` (aware, in ``tz``)."""
    local = now.astimezone(tz)
    if schedule.weekday is not None:
        day = local.date() - timedelta(days=(local.weekday() - WEEKDAYS.index(schedule.weekday)) % 7)
        candidate = _at(day, schedule.at, tz)
        return candidate if candidate <= now else _at(day - timedelta(days=7), schedule.at, tz)
    assert schedule.day_of_month is not None
    day = local.date().replace(day=schedule.day_of_month)
    candidate = _at(day, schedule.at, tz)
    if candidate <= now:
        return candidate
    previous_month = (day.replace(day=1) - timedelta(days=1)).replace(day=schedule.day_of_month)
    return _at(previous_month, schedule.at, tz)


def _at(day: date, at: time, tz: tzinfo) -> datetime:
    return datetime.combine(day, at, tz)


def report_period(schedule: ReportSchedule, occurrence: datetime) -> date:
    """The period an occurrence reports: a day of the previous ISO week (weekly), the previous month (chargeback)."""
    day = occurrence.date()
    if schedule.report == "weekly":
        return day - timedelta(days=day.weekday() + 7)  # the Monday of the week before
    return (day.replace(day=1) - timedelta(days=1)).replace(day=1)
