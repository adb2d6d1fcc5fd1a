"""Sending one notification over one channel: a signed webhook POST, a Slack incoming webhook, an SMTP e-mail.

Each call has its own timeout and raises ``DeliveryError`` (a message without secrets) on any failure; the
service decides about retries. Secrets are read from the environment here, at the moment of sending.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Mapping
from concurrent.futures import Executor
from datetime import datetime
from email.message import EmailMessage

import aiohttp

from spendstream.core.notification_policy import (
    Channel,
    EmailChannel,
    Notifications,
    SlackChannel,
    Smtp,
    WebhookChannel,
)
from spendstream.notifier.messages import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Message,
    email_message,
    redact,
    sign,
    slack_body,
    webhook_body,
)


class DeliveryError(Exception):
    """A failed attempt; the message is safe to log and to record (no secret in it)."""


def channel_secrets(channel: Channel, notifications: Notifications, env: Mapping[str, str]) -> list[str]:
    """The secret values a channel uses, so that errors can be redacted of them."""
    names = [getattr(channel, a, None) for a in ("url_env", "secret_env")]
    if isinstance(channel, EmailChannel) and notifications.smtp is not None:
        names.append(notifications.smtp.password_env)
    return [env[n] for n in names if n and env.get(n)]


def _secret(env: Mapping[str, str], name: str, field: str) -> str:
    value = env.get(name)
    if not value:
        raise DeliveryError(f"{field}: environment variable {name} is not set")
    return value


async def send(
    name: str,
    channel: Channel,
    notifications: Notifications,
    message: Message,
    notification: str,
    audience: tuple[str, ...],
    *,
    session: aiohttp.ClientSession,
    email_executor: Executor,
    env: Mapping[str, str],
    now: datetime,
) -> None:
    """One attempt; returns when the receiver accepted the notification, raises ``DeliveryError`` otherwise."""
    timeout = notifications.retry.timeout_s
    try:
        if isinstance(channel, WebhookChannel):
            url = channel.url or _secret(env, channel.url_env or "", f"channels.{name}.url_env")
            secret = _secret(env, channel.secret_env, f"channels.{name}.secret_env")
            body = webhook_body(message, notification, name, audience)
            timestamp = int(now.timestamp())
            headers = {
                "Content-Type": "application/json",
                IDEMPOTENCY_HEADER: notification,
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(secret, timestamp, body),
            }
            await _post(session, url, body, headers, timeout)
        elif isinstance(channel, SlackChannel):
            url = _secret(env, channel.url_env, f"channels.{name}.url_env")
            headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: notification}
            await _post(session, url, slack_body(message, audience), headers, timeout)
        else:
            smtp = notifications.smtp
            assert smtp is not None  # the policy refuses e-mail channels without a relay
            password = _secret(env, smtp.password_env, "smtp.password_env") if smtp.password_env else None
            mail = email_message(message, notification, smtp.sender, channel.to, now)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(email_executor, _send_mail, smtp, password, mail, timeout)
    except DeliveryError as exc:
        raise DeliveryError(redact(str(exc), channel_secrets(channel, notifications, env))) from None


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as response:
            if 200 <= response.status < 300:
                return
            text = (await response.text(errors="replace"))[:200].strip()
            raise DeliveryError(f"HTTP {response.status}" + (f": {text}" if text else ""))
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        # aiohttp's messages may quote the URL (a Slack URL is a credential): name the failure, not the address
        raise DeliveryError(f"connection failed: {type(exc).__name__}") from None


def _send_mail(smtp_config: Smtp, password: str | None, mail: EmailMessage, timeout: float) -> None:
    try:
        with smtplib.SMTP(smtp_config.host, smtp_config.port, timeout=timeout) as client:
            if smtp_config.starttls:
                client.starttls(context=ssl.create_default_context())
            if smtp_config.username and password is not None:
                client.login(smtp_config.username, password)
            client.send_message(mail)
    except smtplib.SMTPResponseException as exc:
        raise DeliveryError(f"SMTP {exc.smtp_code}: {exc.smtp_error.decode('utf-8', 'replace')[:200]}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"SMTP: {type(exc).__name__}: {exc}"[:300]) from None
