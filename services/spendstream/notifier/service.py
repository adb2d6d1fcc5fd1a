"""The notifier service: alerts, decisions and schedules in, notifications out, every state in the ledger.

Three sources feed it: ``spendstream.alerts`` (each alert routed by the policy's ``notifications`` section),
``spendstream.enforcement`` (the newest decision per scope says what the edges now do; processor heartbeats
tell whether the pipeline is alive) and the report schedules. Each notification is recorded in the
``notifications`` table before the Kafka offsets that caused it are committed (at least once), then delivered
by its channel's own queue and worker: a slow or hanging receiver delays only its own channel, each request has
a timeout, a failure is retried with exponential backoff, and after ``retry.max_attempts`` the row becomes a
dead letter. The idempotency key (``Idempotency-Key`` header, e-mail Message-ID) is the same on every attempt.

Kafka is read in a thread (confluent-kafka), deliveries run on an asyncio loop, ledger calls go to threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any

import aiohttp
from confluent_kafka import Consumer, KafkaError, Message

from spendstream.core import topics
from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.config import Settings
from spendstream.core.events import utcnow
from spendstream.core.notification_policy import (
    Notifications,
    ReportSchedule,
    last_occurrence,
    missing_secrets,
    notification_kind,
    recipients,
    report_period,
)
from spendstream.core.policy import Policy
from spendstream.core.record_signature import vouched_for
from spendstream.notifier.channels import DeliveryError, send
from spendstream.notifier.messages import (
    Delivery,
    alert_message,
    message_from_record,
    message_record,
    notification_id,
    pipeline_message,
)
from spendstream.notifier.messages import Message as Notice
from spendstream.notifier.reports import scheduled_report_message
from spendstream.notifier.store import NotificationStore

log = logging.getLogger(__name__)

MAX_ALERT_AGE = timedelta(days=1)  # older alerts (a group reading a long topic from its start) are not news
REPORT_CATCH_UP = timedelta(days=1)  # a report whose time passed longer ago than this (notifier down) is skipped
SCHEDULE_INTERVAL_S = 20.0


class Notifier:
    """Run with ``run(stop)`` (blocks). ``policy`` fixes the policy; else the one in force on
    ``spendstream.policy`` is followed. ``clock`` and ``env`` are injectable for tests of schedules and secrets."""

    def __init__(
        self,
        settings: Settings,
        client: Any,
        *,
        policy: Policy | None = None,
        group: str = "spendstream-notifier",
        clock: Callable[[], datetime] = utcnow,
        env: Mapping[str, str] | None = None,
        heartbeat_grace_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = NotificationStore(client, settings.clickhouse_database)
        self.group = group
        self.clock = clock
        self.env = os.environ if env is None else env
        self.heartbeat_grace_s = heartbeat_grace_s
        self._policy = policy
        self._follow_policy = policy is None
        self.latest_action: dict[str, str] = {}  # scope -> the action of its newest decision
        self.last_heartbeat: tuple[str, datetime, float] | None = None  # worker, issued_at, interval
        self.ready = threading.Event()
        self.counts = {"recorded": 0, "sent": 0, "failed_attempts": 0, "dead_letters": 0, "unsigned": 0}
        # alerts, decisions and heartbeats are signed by the processor: a forged alert would page people with
        # its text, a forged heartbeat hide a dead processor (None: no keys in this deployment, all are read)
        self.verifier = settings.record_verifier()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight: set[str] = set()
        self._states: asyncio.Queue[Delivery] = asyncio.Queue()  # delivery states on their way to the ledger
        self._session: aiohttp.ClientSession | None = None
        self._mail_executors: dict[str, ThreadPoolExecutor] = {}
        self._codecs = {
            "decision": AvroCodec("decision", settings.schema_registry_url),
            "alert": AvroCodec("alert", settings.schema_registry_url),
            "heartbeat": AvroCodec("heartbeat", settings.schema_registry_url),
        }

    # -- policy -------------------------------------------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        return self._policy

    def _adopt(self, policy: Policy) -> None:
        self._policy = policy
        log.info("notifier: policy %s version %s", policy.name, policy.version)
        # At start the notifier refuses such a policy; one applied while it runs is adopted, so say it here, loudly,
        # rather than only in the failed deliveries of `spendstream notifications list`.
        if policy.notifications is not None:
            for problem in missing_secrets(policy.notifications, self.env):
                log.error("notifier: policy version %s: %s; deliveries through it fail", policy.version, problem)

    @property
    def notifications(self) -> Notifications | None:
        policy = self._policy
        return policy.notifications if policy is not None else None

    # -- routing (pure parts in core.notification_policy and messages) -----------------------------------------

    def deliveries_for(self, notice: Notice, people: list[str] | None = None) -> list[Delivery]:
        """One Delivery per channel the notice goes to under the policy in force."""
        policy, notifications = self._policy, self.notifications
        if policy is None or notifications is None:
            return []
        found = recipients(notifications, notice.kind, notice.scope, policy.ancestors, policy.org, people)
        payload = message_record(notice)
        return [
            Delivery(
                notification_id=notification_id(notice.source_id, r.channel),
                source_id=notice.source_id,
                kind=str(notice.kind),
                scope=notice.scope,
                channel=r.channel,
                channel_kind=notifications.channels[r.channel].kind,
                audience=r.audience,
                title=notice.title,
                payload=payload,
            )
            for r in found
        ]

    # -- the service --------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._main(stop))

    async def _main(self, stop: threading.Event) -> None:
        from spendstream.edge.policy_follower import PolicyFollower

        self._loop = asyncio.get_running_loop()
        follower = None
        if self._follow_policy:
            follower = PolicyFollower(
                self.settings.kafka_client_config(),
                self._adopt,
                schema_registry_url=self.settings.schema_registry_url,
                verifier=self.settings.record_verifier(),
            ).start()
            await asyncio.to_thread(follower.wait_ready, 30)
        self._session = aiohttp.ClientSession()
        halt = threading.Event()  # this notifier's own: ``stop`` may be shared with the other services of a process
        consumer_thread = threading.Thread(target=self._consume, args=(halt,), name="notifier-consumer", daemon=True)
        try:
            for delivery in await asyncio.to_thread(self.store.unfinished):
                self._enqueue(delivery)
            consumer_thread.start()
            background = [
                asyncio.create_task(self._schedules(stop)),
                asyncio.create_task(self._watch_pipeline(stop)),
                asyncio.create_task(self._write_states()),
            ]
            while not stop.is_set():
                await asyncio.sleep(0.1)
            for task in background:
                task.cancel()
        finally:
            halt.set()
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            await asyncio.to_thread(self.store.write, self._drain_states())
            await self._session.close()
            for executor in self._mail_executors.values():
                executor.shutdown(wait=False, cancel_futures=True)
            if consumer_thread.is_alive():
                await asyncio.to_thread(consumer_thread.join, 10)
            if follower is not None:
                follower.stop()

    # -- Kafka: alerts and decisions in, deliveries recorded, then offsets committed ----------------------------

    def _consume(self, stop: threading.Event) -> None:
        consumer = Consumer(
            {
                **self.settings.kafka_client_config(),
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6_000,
                "heartbeat.interval.ms": 1_000,
                "fetch.wait.max.ms": 50,  # an alert is news: do not let the broker hold a fetch for 500 ms
            }
        )
        consumer.subscribe(
            [topics.ALERTS, topics.ENFORCEMENT], on_assign=lambda *_: self.ready.set()
        )  # fmt: skip
        try:
            while not stop.is_set():
                first = consumer.poll(0.2)  # consume(n, t) would wait out t for n: latency, not throughput
                messages = [first, *consumer.consume(499, 0)] if first is not None else []
                records = [m for m in messages if m.error() is None]
                for m in messages:
                    error = m.error()
                    if error is not None and error.code() != KafkaError._PARTITION_EOF:
                        log.warning("notifier consumer: %s", error)
                if not records:
                    continue
                fresh = self._record_until_done(self._handle(records), stop)
                if fresh is None:
                    return  # stopping before the ledger took them: not committed, read again at the next start
                consumer.commit(asynchronous=False)
                self.counts["recorded"] += len(fresh)
                for delivery in fresh:
                    self._call_in_loop(self._enqueue, delivery)
        except Exception:
            log.exception("notifier consumer stopped")
            raise
        finally:
            consumer.close()

    def _record_until_done(self, deliveries: list[Delivery], stop: threading.Event) -> list[Delivery] | None:
        """Record the deliveries, retrying while the ledger is unreachable (the offsets wait for it)."""
        while not stop.is_set():
            try:
                return self.store.record_new(deliveries, self.clock())
            except Exception as exc:  # the ledger's client raises its own error types
                log.warning(
                    "notifier: cannot record %d notifications in the ledger (retrying): %s", len(deliveries), exc
                )
                stop.wait(1.0)
        return None

    def _handle(self, records: list[Message]) -> list[Delivery]:
        """Decisions and heartbeats update what the notifier knows; alerts become deliveries."""
        alerts = []
        for message in records:
            value = message.value()
            if value is None:
                continue
            if not vouched_for(self.verifier, message.topic(), message):
                self.counts["unsigned"] += 1
                if self.counts["unsigned"] & (self.counts["unsigned"] - 1) == 0:  # the 1st, 2nd, 4th, 8th...
                    log.warning(
                        "notifier: ignoring a record on %s that is not signed with the processor's key (key %r; %d "
                        "so far): a client that may write to the topic forged it, or the processor has no signing key",
                        message.topic(), message.key(), self.counts["unsigned"],
                    )  # fmt: skip
                continue
            try:
                if message.topic() == topics.ENFORCEMENT:
                    if (message.key() or b"").startswith(topics.HEARTBEAT_KEY_PREFIX):
                        beat = self._codecs["heartbeat"].decode(value)
                        self.last_heartbeat = (beat["worker"], beat["issued_at"], float(beat["interval_s"]))
                    else:
                        decision = self._codecs["decision"].decode(value)
                        self.latest_action[decision["scope"]] = str(decision["action"])
                else:
                    alerts.append(self._codecs["alert"].decode(value))
            except (DecodeError, KeyError) as exc:
                log.warning("notifier: skipping an undecodable %s record: %s", message.topic(), exc)
        deliveries = []
        now = self.clock()
        for alert in alerts:
            if alert["occurred_at"] < now - MAX_ALERT_AGE:
                continue
            kind = notification_kind(str(alert["kind"]), str(alert["severity"]))
            dashboard = self.notifications.dashboard_url if self.notifications else None
            notice = alert_message(alert, kind, self.latest_action.get(alert["scope"]), dashboard)
            deliveries += self.deliveries_for(notice)
        return deliveries

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    # -- delivery: one queue and one worker per channel ---------------------------------------------------------

    def _enqueue(self, delivery: Delivery) -> None:
        if delivery.notification_id in self._in_flight:
            return
        self._in_flight.add(delivery.notification_id)
        wait = 0.0
        if delivery.next_attempt_at is not None:
            wait = max((delivery.next_attempt_at - self.clock()).total_seconds(), 0.0)
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._queue_for(delivery.channel).put_nowait, delivery)
        else:
            self._queue_for(delivery.channel).put_nowait(delivery)

    def _queue_for(self, channel: str) -> asyncio.Queue[Delivery]:
        queue = self._queues.get(channel)
        if queue is None:
            queue = self._queues[channel] = asyncio.Queue()
            self._workers.append(asyncio.get_running_loop().create_task(self._channel_worker(queue)))
        return queue

    async def _channel_worker(self, queue: asyncio.Queue[Delivery]) -> None:
        while True:
            delivery = await queue.get()
            try:
                await self._attempt(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the channel: the row stays unfinished for the next start
                log.exception("notifier: delivery %s failed unexpectedly", delivery.notification_id)
                self._in_flight.discard(delivery.notification_id)

    async def _attempt(self, delivery: Delivery) -> None:
        notifications = self.notifications
        now = self.clock()
        error = ""
        try:
            if notifications is None or delivery.channel not in notifications.channels:
                raise DeliveryError(f"channel {delivery.channel!r} is not in the policy in force")
            assert self._session is not None
            await send(
                delivery.channel,
                notifications.channels[delivery.channel],
                notifications,
                message_from_record(delivery.payload),
                delivery.notification_id,
                delivery.audience,
                session=self._session,
                email_executor=self._mail_executor(delivery.channel),
                env=self.env,
                now=now,
            )
        except DeliveryError as exc:
            error = str(exc)
        delivery.attempts += 1
        retry = notifications.retry if notifications is not None else None
        if not error:
            delivery.status, delivery.sent_at, delivery.last_error, delivery.next_attempt_at = "sent", now, "", None
            self.counts["sent"] += 1
        elif retry is not None and delivery.attempts < retry.max_attempts:
            backoff = retry.backoff_s(delivery.attempts)
            delivery.status, delivery.last_error = "failed", error
            delivery.next_attempt_at = now + timedelta(seconds=backoff)
            self.counts["failed_attempts"] += 1
            log.info("notification %s to %s failed (attempt %d, retry in %g s): %s",
                     delivery.notification_id, delivery.channel, delivery.attempts, backoff, error)  # fmt: skip
        else:
            delivery.status, delivery.last_error, delivery.next_attempt_at = "dead_letter", error, None
            self.counts["dead_letters"] += 1
            log.warning("notification %s to %s is a dead letter after %d attempts: %s",
                        delivery.notification_id, delivery.channel, delivery.attempts, error)  # fmt: skip
        self._states.put_nowait(replace(delivery))
        if delivery.status == "failed" and delivery.next_attempt_at is not None:
            wait = (delivery.next_attempt_at - now).total_seconds()
            asyncio.get_running_loop().call_later(wait, self._queue_for(delivery.channel).put_nowait, delivery)
        else:
            self._in_flight.discard(delivery.notification_id)

    async def _write_states(self) -> None:
        """Write delivery states in batches (one insert for whatever accumulated during the previous one): a
        state lost in a crash only means the row is still pending, and a restart delivers it again."""
        while True:
            first = await self._states.get()
            await asyncio.to_thread(self.store.write, [first, *self._drain_states()], self.clock())

    def _drain_states(self) -> list[Delivery]:
        batch = []
        while not self._states.empty():
            batch.append(self._states.get_nowait())
        return batch

    def _mail_executor(self, channel: str) -> ThreadPoolExecutor:
        """A thread per e-mail channel: a hanging SMTP server holds only its own channel's thread."""
        executor = self._mail_executors.get(channel)
        if executor is None:
            executor = self._mail_executors[channel] = ThreadPoolExecutor(1, thread_name_prefix=f"smtp-{channel}")
        return executor

    # -- schedules and the pipeline's health --------------------------------------------------------------------

    async def _schedules(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for delivery in await asyncio.to_thread(self.due_reports):
                    self._enqueue(delivery)
            except Exception:
                log.exception("notifier: scheduled reports failed; retrying")
            await asyncio.sleep(SCHEDULE_INTERVAL_S)

    def due_reports(self) -> list[Delivery]:
        """Record (and return) the deliveries of every report whose scheduled time has come and which the ledger
        does not show as handled: a restart never sends one twice, a missed one is sent once within a day."""
        policy, notifications = self._policy, self.notifications
        if policy is None or notifications is None:
            return []
        now = self.clock()
        due = []
        for schedule in notifications.reports:
            occurrence = last_occurrence(schedule, now, policy.tz)
            if now - occurrence > REPORT_CATCH_UP:
                continue
            period = report_period(schedule, occurrence)
            source = report_source_id(schedule, period)
            if self.store.has_source(source):
                continue
            db, link = self.settings.clickhouse_database, notifications.dashboard_url
            notice = scheduled_report_message(self.client, db, policy.timezone, schedule, period, source, link, now)
            due += self.deliveries_for(notice, people=list(schedule.to))
        fresh = self.store.record_new(due, now)
        self.counts["recorded"] += len(fresh)
        return fresh

    async def _watch_pipeline(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for delivery in await asyncio.to_thread(self.pipeline_alarm):
                    self._enqueue(delivery)
            except Exception:
                log.exception("notifier: pipeline watch failed; retrying")
            await asyncio.sleep(2.0)

    def pipeline_alarm(self) -> list[Delivery]:
        """A pipeline_unhealthy notification when the processors' heartbeats stopped (once per silence)."""
        beat = self.last_heartbeat
        if beat is None:
            return []
        worker, issued_at, interval = beat
        now = self.clock()
        if now - issued_at < timedelta(seconds=max(self.heartbeat_grace_s, 10 * interval)):
            return []
        dashboard = self.notifications.dashboard_url if self.notifications else None
        fresh = self.store.record_new(self.deliveries_for(pipeline_message(worker, issued_at, now, dashboard)), now)
        self.counts["recorded"] += len(fresh)
        return fresh


def report_source_id(schedule: ReportSchedule, period: date) -> str:
    """A scheduled report is one per schedule and period reported on (the week, the month): a policy that moves its
    timezone moves the instant it is due, but the week it reports on was sent already (a user session got the same
    week's report twice)."""
    return f"report:{schedule.id}:{period.isoformat()}"
