"""``spendstream demo``: the product's story, told by the real pipeline in about a minute.

Five departments send LLM traffic through a real gateway (answered by the stub upstream) on the embedded
stack: broker, processor, and the sink that owns the ledger and serves the API. Marketing spends its way
through 80 % (alert), 90 % (fallback to a cheaper model) and 100 % (shutoff); a runaway loop in one sales
feature trips the spike rule (emergency stop); a new day lifts every decision; the CFO weekly report and
the chargeback table are then read back from the ledger through the API.

Time is the hard part: the processor windows by event time, decisions expire at the end of their period, and
a new period starts at local midnight. So the gateway runs in this process with a demo clock: traffic is
stamped yesterday from 06:00 UTC on, hour by hour, and later the clock jumps to the real now. The processor
sees events of yesterday arrive today, so the demo widens its allowed lateness to three days.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import secrets
import shutil
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import aiohttp

from spendstream.core.config import Settings, load_settings
from spendstream.core.events import UsageEvent
from spendstream.core.topics import ALERTS, ENFORCEMENT, HEARTBEAT_KEY_PREFIX

ALLOWED_LATENESS_S = 3 * 86_400  # yesterday's events arrive today
DECISION_TIMEOUT_S = 30.0
FIRST_HOUR = 6  # yesterday 06:00 UTC: the morning starts
BASELINE_HOURS = 3  # 06:00-09:00, the spike rule's min_history_hours
CONCURRENCY = 8
LOOP_PAUSE_S = 0.025  # the runaway loop's pace (~40 calls/s): fast enough to spike, slow enough to stop in time
# Stage 1 of the processor commits its progress on spendstream.usage to this group (``usage_group`` of the
# default app id): the sum of its committed offsets is how many events the processor has folded into its windows.
PROCESSOR_USAGE_GROUP = "spendstream-processor-usage"
ASCII_SYMBOLS = {"⚠": "!", "↘": "v", "⛔": "x", "✓": "+", "·": "-"}  # for terminals that cannot show the others


@dataclass(frozen=True)
class Persona:
    """One department's steady traffic: one feature, one model, a few users, so many calls per hour."""

    team: str
    feature: str
    model: str
    per_hour: int
    users: tuple[str, ...]
    anthropic: bool = False
    words: int = 40
    max_tokens: int = 200


ENGINEERING = Persona("engineering", "ai_code_review", "gpt-4o", 30, ("dev-ana", "dev-ben", "dev-chen"))
PRODUCT = Persona("product", "ai_research_assistant", "gpt-4o", 20, ("pm-dara", "pm-eli"))
MARKETING = Persona(
    "marketing", "ai_content_generator", "claude-3-5-sonnet", 60, ("mk-fay", "mk-gus", "mk-hana"), anthropic=True
)
SALES = Persona("sales", "ai_lead_scorer", "gpt-4o", 20, ("sales-batch",))
SALES_EMAIL = Persona("sales", "ai_email_assistant", "gpt-4o", 10, ("sales-ivy", "sales-jon"), max_tokens=120)
SUPPORT = Persona("support", "ai_chatbot", "claude-3-haiku", 40, ("cust-k", "cust-l", "cust-m"), anthropic=True)
PERSONAS = (ENGINEERING, PRODUCT, MARKETING, SALES, SALES_EMAIL, SUPPORT)
TEAMS = ("engineering", "product", "marketing", "sales", "support")


class DemoError(RuntimeError):
    """The story could not go on (a service did not answer in time); the message says where to look."""


class DemoClock:
    """The time the gateway stamps events with and judges decision expiry by: set by the story, or real."""

    def __init__(self, start: datetime) -> None:
        self._now: datetime | None = start

    def __call__(self) -> datetime:
        return self._now if self._now is not None else datetime.now(UTC)

    def set(self, instant: datetime) -> None:
        self._now = instant

    def follow_real_time(self) -> None:
        self._now = None


class RecordingEmitter:
    """The gateway's Emitter, plus a record of every event it was given and when: what the demo really sent.

    ``emitted_at`` is the wall-clock instant the gateway metered each call (the demo clock only stamps
    ``occurred_at``), so the story can time the pipeline from the call that crossed a threshold.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[UsageEvent] = []
        self.emitted_at: list[float] = []  # time.time() per event, same index as ``events``
        self.total_nanos = 0
        self._changed = threading.Condition()

    def emit(self, event: UsageEvent) -> None:
        with self._changed:  # one writer (the gateway's thread); readers copy under the lock or use wait_for
            self.events.append(event)
            self.emitted_at.append(time.time())
            self.total_nanos += event.cost_nanos or 0
            self._changed.notify_all()
        self.inner.emit(event)

    @property
    def stats(self) -> Any:
        return self.inner.stats

    def wait_for(self, after: int, matches: Callable[[UsageEvent], bool], timeout: float) -> UsageEvent:
        """The first event at index >= ``after`` that ``matches``, waiting for the gateway to meter it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((e for e in self.events[after:] if matches(e)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DemoError(f"the gateway did not meter the call within {timeout:.0f}s")
                self._changed.wait(left)

    def crossing(self, team: str, day: date, limit: int) -> float | None:
        """When the gateway metered the call that took ``team``'s spend on ``day`` to ``limit`` (epoch seconds)."""
        total = 0
        with self._changed:
            for event, at in zip(self.events, self.emitted_at, strict=True):
                if event.team == team and event.occurred_at.date() == day:
                    total += event.cost_nanos or 0
                    if total >= limit:
                        return at
        return None

    def spend(
        self, team: str, day: date | None = None, feature: str | None = None, hour: datetime | None = None
    ) -> int:
        total = 0
        for e in list(self.events):
            if e.team != team and team != "*":
                continue
            if feature is not None and e.feature != feature:
                continue
            if day is not None and e.occurred_at.date() != day:
                continue
            if hour is not None and e.occurred_at.replace(minute=0, second=0, microsecond=0) != hour:
                continue
            total += e.cost_nanos or 0
        return total

    def by_team(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for e in list(self.events):
            totals[e.team] += e.cost_nanos or 0
        return dict(totals)


class Watcher(threading.Thread):
    """Follows the alerts and enforcement topics from the beginning (no consumer group), for the narration."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(name="demo-watcher", daemon=True)
        self.bootstrap = bootstrap
        self.alerts: list[Any] = []
        self.decisions: list[Any] = []
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from spendstream.core.codec import AvroCodec
        from spendstream.core.events import Alert, Decision

        codecs = {
            ALERTS: (AvroCodec("alert"), Alert, self.alerts),
            ENFORCEMENT: (AvroCodec("decision"), Decision, self.decisions),
        }
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "spendstream-demo", "enable.auto.commit": False}
        )
        try:
            assignment = []
            for topic in codecs:
                for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                    assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
            consumer.assign(assignment)
            self.ready.set()
            while not self.stopping.is_set():
                for message in consumer.consume(500, timeout=0.1):
                    if message.error() is not None or message.value() is None:
                        continue
                    if (message.key() or b"").startswith(HEARTBEAT_KEY_PREFIX):
                        continue  # a processor's proof of life, not a decision
                    codec, model, into = codecs[message.topic()]
                    into.append((time.time(), model.from_avro(codec.decode(message.value()))))
        finally:
            consumer.close()

    def find_alert(self, scope: str, kind: str, contains: str = "") -> Any | None:
        for _, alert in list(self.alerts):
            if alert.scope == scope and alert.kind.value == kind and contains in alert.message:
                return alert
        return None

    def find_decision(self, scope: str, action: str, after_version: int = 0) -> Any | None:
        for _, decision in list(self.decisions):
            if decision.scope == scope and decision.action.value == action and decision.version > after_version:
                return decision
        return None


@dataclass
class Outcome:
    status: int
    decision: str
    model: str  # the model the upstream answered as ("" when blocked)
    headers: dict[str, str]
    error: dict[str, Any] = field(default_factory=dict)


def usd(nanos: int, places: int = 2) -> str:
    return f"${Decimal(nanos) / 10**9:,.{places}f}"


def pct(part: int, whole: int) -> str:
    return f"{Decimal(100 * part) / whole:.0f}%" if whole else "-"


class Progress:
    """A one-line counter while traffic flows (redrawn in place on a terminal, printed once otherwise)."""

    def __init__(self, out: IO[str], label: str, total: int | None, spent: Callable[[], int]) -> None:
        self.out, self.label, self.total = out, label, total
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.counts: Counter[str] = Counter()
        self._spent, self._spent_at_start = spent, spent()
        self._drawn = 0.0

    @property
    def spend(self) -> int:
        return self._spent() - self._spent_at_start

    def add(self, outcome: Outcome) -> None:
        self.counts["calls"] += 1
        self.counts[outcome.decision if outcome.status < 400 else f"{outcome.status}"] += 1
        if self.tty and time.monotonic() - self._drawn > 0.08:
            self._draw("\r")

    def _line(self) -> str:
        done = self.counts["calls"]
        bar = ""
        if self.total:
            filled = round(24 * done / self.total)
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] "
        parts = [f"{k} {v}" for k, v in sorted(self.counts.items()) if k != "calls"]
        return f"    {self.label:<22} {bar}{done:>4} calls  {usd(self.spend, 4):>9}  ({', '.join(parts)})"

    def _draw(self, prefix: str) -> None:
        self.out.write(prefix + self._line() + "\033[K" if self.tty else prefix + self._line())
        self.out.flush()
        self._drawn = time.monotonic()

    def done(self) -> None:
        self._draw("\r" if self.tty else "")
        self.out.write("\n")
        self.out.flush()


class Story:
    """The acts, in order; ``summary`` collects what a test (or a curious reader) can check afterwards."""

    def __init__(
        self,
        out: IO[str],
        clock: DemoClock,
        gateway_url: str,
        key: str,
        gateway: Any,
        emitter: RecordingEmitter,
        watcher: Watcher,
        policy: Any,
    ) -> None:
        self.out = out
        self.clock = clock
        self.url = gateway_url
        self.key = key
        self.gateway = gateway
        self.emitter = emitter
        self.watcher = watcher
        self.policy = policy
        self.budgets = {b.scope.partition(":")[2]: b.limit_nanos for b in policy.budgets if b.scope.startswith("team:")}
        self.steps: list[dict[str, Any]] = []
        self.rules_seen: dict[tuple[str, str, int], float] = {}  # (scope, action, version) -> first held, epoch s
        self.session: aiohttp.ClientSession | None = None
        self.started = time.monotonic()
        now = datetime.now(UTC)
        self.yesterday = (now - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        self._seq = 0

    # -- output -------------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def act(self, number: int, title: str, when: str) -> None:
        self.say()
        self.say(f"Act {number}. {title}   [{when}]  (+{time.monotonic() - self.started:.0f}s)")

    def event(self, symbol: str, text: str) -> None:
        try:
            symbol.encode(getattr(self.out, "encoding", None) or "ascii")
        except UnicodeEncodeError:
            symbol = ASCII_SYMBOLS.get(symbol, "-")
        self.say(f"  {symbol} {text}")

    # -- traffic ------------------------------------------------------------------------------------
    async def call(self, persona: Persona, user: str | None = None, feature: str | None = None) -> Outcome:
        assert self.session is not None
        self._seq += 1
        prompt = " ".join(f"w{(self._seq + i) % 97}" for i in range(persona.words))
        headers = {
            "Authorization": f"Bearer {self.key}",
            "X-Spendstream-Team": persona.team,
            "X-Spendstream-Feature": feature or persona.feature,
            "X-Spendstream-User": user or persona.users[self._seq % len(persona.users)],
            "X-Spendstream-Environment": "production",
        }
        body = {
            "model": persona.model,
            "max_tokens": persona.max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
        path = "/v1/messages" if persona.anthropic else "/v1/chat/completions"
        async with self.session.post(self.url + path, json=body, headers=headers) as response:
            data = await response.json(content_type=None)
            out = Outcome(
                response.status,
                response.headers.get("X-Spendstream-Decision", ""),
                data.get("model", "") if response.status < 400 else "",
                {k: v for k, v in response.headers.items() if k.lower().startswith(("x-spendstream", "retry-after"))},
                data.get("error", {}) if response.status >= 400 else {},
            )
        return out

    async def traffic(
        self,
        calls: Sequence[Persona],
        start: datetime,
        step: timedelta,
        label: str,
        stop: Callable[[], bool] | None = None,
        pause_s: float = 0.0,
    ) -> Progress:
        """Send ``calls`` with up to CONCURRENCY in flight, the clock moving ``step`` per call from ``start``;
        ``stop`` is asked after every completed call (paced traffic sends one wave at a time)."""
        progress = Progress(self.out, label, None if stop else len(calls), lambda: self.emitter.total_nanos)
        semaphore = asyncio.Semaphore(CONCURRENCY)
        pending: set[asyncio.Task[None]] = set()

        async def one(persona: Persona) -> None:
            try:
                progress.add(await self.call(persona))
            finally:
                semaphore.release()

        for i, persona in enumerate(calls):
            await semaphore.acquire()
            if stop is not None and stop():
                semaphore.release()
                break
            self.clock.set(start + i * step)
            task = asyncio.create_task(one(persona))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if pause_s:
                await asyncio.sleep(pause_s)
        if pending:
            await asyncio.gather(*pending)
        progress.done()
        return progress

    def hour(self, h: int) -> datetime:
        return self.yesterday + timedelta(hours=h)

    def hourly_mix(self, personas: Sequence[Persona]) -> list[Persona]:
        """One hour of the given personas' calls, interleaved the way independent services would send them."""
        queues = [[p] * p.per_hour for p in personas]
        mixed: list[Persona] = []
        while any(queues):
            for q in queues:
                if q:
                    mixed.append(q.pop())
        return mixed

    def cost_as(self, event: UsageEvent, model: str) -> int:
        """What the tokens of ``event`` would have cost on ``model``, priced as the pipeline prices them."""
        from spendstream.core.pricing import price_usage

        return price_usage(
            event.provider,
            model,
            event.input_tokens,
            event.output_tokens,
            event.cached_input_tokens,
            event.cache_write_tokens,
            event.occurred_at,
            self.policy.price_table,
        ).cost_nanos

    async def time_decision(self, scope: str, action: str, crossed_at: float | None) -> dict[str, Any]:
        """Milliseconds from the crossing call to the processor's ``issued_at`` and to the gateway holding it.

        Both ends are the records' own instants: when the gateway metered the call, the Decision's ``issued_at``
        (what the ledger's ``decisions`` table stores), and when the gateway's Enforcer first held it.
        """
        if crossed_at is None:
            raise DemoError(f"no call took {scope} to its {action} threshold")
        version, held_at = await self.wait_rule(scope, action)
        decision = await self.wait_decision(scope, action, version - 1)
        return {
            "version": version,
            "decided_ms": round((decision.issued_at.timestamp() - crossed_at) * 1000),
            "applied_ms": round((held_at - crossed_at) * 1000),
        }

    async def processor_caught_up(self) -> int:
        """Wait until the processor has folded every event sent so far into its windows; returns their count.

        Without it the first threshold of the story was timed behind the backlog of the traffic before it: the
        80 % alert took 0.2 s or 2 s depending on how far the processor was behind on a busy machine.
        """
        from confluent_kafka import Consumer, TopicPartition

        from spendstream.core.topics import USAGE

        self.gateway.flush_metering()  # the events of the requests answered so far, in the Emitter
        self.emitter.inner.flush(DECISION_TIMEOUT_S)
        sent = len(self.emitter.events)
        consumer = Consumer({"bootstrap.servers": self.watcher.bootstrap, "group.id": PROCESSOR_USAGE_GROUP})
        try:
            partitions = consumer.list_topics(USAGE, timeout=10).topics[USAGE].partitions
            deadline = time.monotonic() + DECISION_TIMEOUT_S
            while True:
                committed = await asyncio.to_thread(
                    consumer.committed, [TopicPartition(USAGE, p) for p in partitions], 10
                )
                folded = sum(max(tp.offset, 0) for tp in committed)
                if folded >= sent:
                    return folded
                if time.monotonic() > deadline:
                    raise DemoError(f"the processor folded {folded} of {sent} events in {DECISION_TIMEOUT_S:.0f}s")
                await asyncio.sleep(0.05)
        finally:
            consumer.close()

    async def follow_rules(self) -> None:
        """Note when the gateway's Enforcer first holds each (scope, action, version): polled every 5 ms."""
        assert self.gateway.enforcer is not None
        while True:
            now = time.time()
            for scope, rule in self.gateway.enforcer.decisions().items():
                self.rules_seen.setdefault((scope, rule.action, rule.version), now)
            await asyncio.sleep(0.005)

    async def wait_rule(self, scope: str, action: str, after_version: int = 0) -> tuple[int, float]:
        """The version of the first ``action`` rule for ``scope`` the gateway holds, and when it got it."""
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while time.monotonic() < deadline:
            for (seen_scope, seen_action, version), at in list(self.rules_seen.items()):
                if seen_scope == scope and seen_action == action and version > after_version:
                    return version, at
            await asyncio.sleep(0.005)
        raise DemoError(f"no {action} decision for {scope} reached the gateway within {DECISION_TIMEOUT_S:.0f}s")

    async def wait_decision(self, scope: str, action: str, after_version: int = 0) -> Any:
        """The processor's Decision record as the enforcement topic carries it (and the ledger stores it)."""
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while time.monotonic() < deadline:
            decision = self.watcher.find_decision(scope, action, after_version)
            if decision is not None:
                return decision
            await asyncio.sleep(0.005)
        raise DemoError(f"no {action} decision for {scope} on the enforcement topic within {DECISION_TIMEOUT_S:.0f}s")

    async def wait_alert(self, scope: str, kind: str, contains: str = "") -> Any:
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while time.monotonic() < deadline:
            alert = self.watcher.find_alert(scope, kind, contains)
            if alert is not None:
                return alert
            await asyncio.sleep(0.02)
        raise DemoError(f"no {kind} alert for {scope} within {DECISION_TIMEOUT_S:.0f}s")

    # -- the acts -----------------------------------------------------------------------------------
    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
        rules = asyncio.create_task(self.follow_rules())
        try:
            async with aiohttp.ClientSession(connector=connector) as self.session:
                await self.act_morning()
                await self.act_budget()
                await self.act_runaway()
                await self.act_new_day()
        finally:
            rules.cancel()

    async def act_morning(self) -> None:
        day = self.yesterday.date()
        self.act(1, "A normal morning: five departments at work", f"yesterday {day} 06:00-09:00 UTC")
        self.say("    Each department calls its models through the gateway; every call becomes one usage event.")
        mix = self.hourly_mix(PERSONAS)
        for h in range(FIRST_HOUR, FIRST_HOUR + BASELINE_HOURS):
            await self.traffic(mix, self.hour(h), timedelta(seconds=3600 / len(mix)), f"{h:02d}:00-{h + 1:02d}:00")
        for team in TEAMS:
            spent, budget = self.emitter.spend(team, day), self.budgets[team]
            self.event("·", f"{team:<12} {usd(spent):>7} of its {usd(budget)} daily budget ({pct(spent, budget)})")

    async def act_budget(self) -> None:
        day = self.yesterday.date()
        budget = self.budgets["marketing"]
        self.act(2, "Marketing launches a campaign and approaches its budget", "yesterday 09:00 UTC")
        others = [p for p in PERSONAS if p.team != "marketing"]
        start = self.hour(9)
        step = timedelta(seconds=6)
        progress = await self.traffic(self.hourly_mix(others), start, step, "other departments")
        start += step * progress.counts["calls"]
        folded = await self.processor_caught_up()
        self.say(f"    the processor has every call so far in its spend windows ({folded} events); the campaign starts")
        endless = [MARKETING] * 10_000
        for fraction, action, label in (
            (Decimal("0.80"), "alert", "to 80%"),
            (Decimal("0.90"), "fallback", "to 90%"),
            (Decimal("1.00"), "shutoff", "to 100%"),
        ):
            limit = int(budget * fraction)
            progress = await self.traffic(
                endless,
                start,
                step,
                f"marketing {label}",
                stop=lambda limit=limit: self.emitter.spend("marketing", day) >= limit,
            )
            start += step * progress.counts["calls"]
            timing = await self.time_decision("team:marketing", action, self.emitter.crossing("marketing", day, limit))
            spent = self.emitter.spend("marketing", day)
            alert = await self.wait_alert("team:marketing", "threshold", f"{action}:")
            self.clock.set(start)
            metered = len(self.emitter.events)
            sample = await self.call(MARKETING)
            step_record: dict[str, Any] = {
                "step": action,
                "scope": "team:marketing",
                "spend_nanos": spent,
                "limit_nanos": budget,
                **timing,
                "status": sample.status,
                "decision_header": sample.decision,
            }
            when = (
                f"decided {timing['decided_ms']} ms after the crossing call, "
                f"held by the gateway {timing['applied_ms']} ms after it"
            )
            if action == "alert":
                self.event("⚠", f"80% ALERT  {alert.message}")
                self.event(" ", when)
                self.event(
                    " ",
                    f"calls still go out: HTTP {sample.status}, model {sample.model}, "
                    f"X-Spendstream-Decision: {sample.decision}",
                )
            elif action == "fallback":
                served = await asyncio.to_thread(
                    self.emitter.wait_for, metered, lambda e: e.team == MARKETING.team, DECISION_TIMEOUT_S
                )
                served_cost = served.cost_nanos or 0
                asked_cost = self.cost_as(served, MARKETING.model)
                self.event("↘", f"90% FALLBACK  {alert.message}")
                self.event(" ", when)
                self.event(
                    " ",
                    f"the gateway rewrites the model: asked {MARKETING.model}, the upstream answered as "
                    f"{sample.model} (X-Spendstream-Model: {sample.headers.get('X-Spendstream-Model')}), "
                    f"metered at {usd(served_cost, 5)} instead of {usd(asked_cost, 5)} for the same tokens",
                )
                step_record.update(
                    requested=MARKETING.model,
                    served=sample.model,
                    model_header=sample.headers.get("X-Spendstream-Model"),
                    served_cost_nanos=served_cost,
                    requested_cost_nanos=asked_cost,
                )
            else:
                error = sample.error
                retry = int(sample.headers.get("Retry-After", "0"))
                self.event("⛔", f"100% SHUTOFF  {alert.message}")
                self.event(" ", when)
                self.event(
                    " ",
                    f'HTTP {sample.status} {error.get("code")}: "{error.get("message")}" '
                    f"(X-Spendstream-Scope {sample.headers.get('X-Spendstream-Scope')}, "
                    f"Retry-After {retry // 3600}h{retry % 3600 // 60:02d}m: at midnight)",
                )
                step_record.update(
                    code=error.get("code"),
                    message=error.get("message"),
                    blocked_scope=sample.headers.get("X-Spendstream-Scope"),
                )
            self.steps.append(step_record)
            start += step
        spent = self.emitter.spend("marketing", day)
        self.event("·", f"marketing spent {usd(spent)} of {usd(budget)}: nothing more leaves for it today")

    async def act_runaway(self) -> None:
        self.act(3, "A runaway loop in sales' lead scorer", "yesterday 10:00 UTC")
        hour = self.hour(10)
        others = [p for p in PERSONAS if p.feature != SALES.feature]
        mix = self.hourly_mix(others)
        step = timedelta(seconds=4)
        progress = await self.traffic(mix, hour, step, "normal traffic")
        refused = progress.counts["402"]
        self.event("·", f"{refused} marketing calls refused at the gateway (402), none reached a provider, $0.00 spent")
        start = hour + step * progress.counts["calls"]
        baseline = self.emitter.spend("sales", feature=SALES.feature, hour=self.hour(9))
        self.say(f"    a retry bug re-scores the whole lead list, again and again (hourly baseline {usd(baseline)})")

        def stopped() -> bool:
            rule = self.gateway.enforcer.decisions().get(f"feature:{SALES.feature}")
            return rule is not None and rule.action == "shutoff"

        began = time.monotonic()
        loop_step = timedelta(seconds=1)
        progress = await self.traffic(
            [SALES] * 20_000, start, loop_step, "lead scorer loop", stop=stopped, pause_s=LOOP_PAUSE_S
        )
        start += loop_step * progress.counts["calls"]
        if not stopped():
            raise DemoError("the runaway loop was not stopped")
        alert = await self.wait_alert(f"feature:{SALES.feature}", "spike")
        loop_spend = self.emitter.spend("sales", feature=SALES.feature, hour=hour)
        self.event("⛔", f"EMERGENCY STOP  {alert.message}")
        self.event(
            " ",
            f"the loop ran {time.monotonic() - began:.1f}s: {progress.counts['calls']} calls, "
            f"{usd(loop_spend)} this hour",
        )
        self.clock.set(start)
        blocked = await self.call(SALES)
        email = await self.call(SALES_EMAIL)
        self.event(
            " ",
            f"next lead-scorer call: HTTP {blocked.status} {blocked.error.get('code')} "
            f"(X-Spendstream-Scope {blocked.headers.get('X-Spendstream-Scope')}); "
            f"sales' email assistant still answers: HTTP {email.status}",
        )
        self.steps.append(
            {
                "step": "spike_stop",
                "scope": f"feature:{SALES.feature}",
                "status": blocked.status,
                "code": blocked.error.get("code"),
                "blocked_scope": blocked.headers.get("X-Spendstream-Scope"),
                "other_feature_status": email.status,
                "loop_calls": progress.counts["calls"],
                "alert": alert.message,
            }
        )

    async def act_new_day(self) -> None:
        now = datetime.now(UTC)
        self.act(4, "Midnight: a new day, a new budget period", f"today {now:%Y-%m-%d %H:%M} UTC (the real now)")
        versions = {
            scope: self.gateway.enforcer.decisions()[scope].version
            for scope in ("team:marketing", f"feature:{SALES.feature}")
        }
        self.clock.follow_real_time()
        self.say("    yesterday's decisions expire at midnight; the gateway stops applying them at once")
        marketing = await self.call(MARKETING)
        scorer = await self.call(SALES)
        self.event("✓", f"marketing: HTTP {marketing.status} ({marketing.model}, decision {marketing.decision})")
        self.event("✓", f"lead scorer: HTTP {scorer.status} ({scorer.model}, decision {scorer.decision})")
        lifted: dict[str, str] = {}
        for scope, version in versions.items():
            await self.wait_rule(scope, "allow", version)
            decision = self.watcher.find_decision(scope, "allow", version)
            lifted[scope] = decision.reason if decision is not None else "allow"
            self.event("✓", f"processor: {scope} allow  ({lifted[scope]})")
        await self.traffic(PERSONAS, now, timedelta(0), "today's first calls")
        self.clock.follow_real_time()
        self.steps.append(
            {
                "step": "lift",
                "marketing_status": marketing.status,
                "lead_scorer_status": scorer.status,
                "decisions": lifted,
            }
        )


def demo_policy_path() -> Path:
    checkout = Path(__file__).resolve().parents[3] / "infra" / "policy" / "demo.yaml"
    if checkout.is_file():
        return checkout
    from importlib import resources

    return Path(str(resources.files("spendstream") / "_policy" / "demo.yaml"))


def _pick_port(preferred: int) -> int:
    from spendstream.runtime.dev_stack import _port_free
    from spendstream.runtime.embedded_broker import free_port

    return preferred if preferred and _port_free(preferred) else free_port()


def _api(url: str, token: str | None = None, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def run_demo(
    settings: Settings, *, keep_running: bool = False, json_summary: Path | None = None, out: IO[str] = sys.stdout
) -> int:
    from spendstream.analytics.report_model import render, report_from_json
    from spendstream.core.policy import load_policy
    from spendstream.edge.emitter import Emitter
    from spendstream.gateway.app import Gateway, GatewayThread
    from spendstream.gateway.config import load_gateway_config
    from spendstream.gateway.stub_upstream import StubUpstream
    from spendstream.runtime.dev_stack import DevStack, write_dev_gateway_config

    began = time.monotonic()
    logging.getLogger("spendstream").setLevel(logging.WARNING)  # the story speaks; services log to their files
    data_dir = (settings.data_dir / "demo").resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    policy_path = demo_policy_path()
    policy = load_policy(policy_path)
    admin_token = secrets.token_urlsafe(24)
    stack_settings = load_settings(
        data_dir=data_dir,
        clickhouse_dsn=None,
        api_port=_pick_port(settings.api_port),
        gateway_port=_pick_port(settings.gateway_port),
        kafka_bootstrap=settings.kafka_bootstrap,
    )
    api = f"http://{stack_settings.api_host}:{stack_settings.api_port}"
    print("spendstream demo: LLM spend governance, told by the real pipeline on this machine", file=out)
    print(
        f"  policy {policy_path.name}: five departments with DAILY budgets, alert 80% / fallback 90% / shutoff 100%,",
        file=out,
    )
    print(
        "  an hourly spike rule that stops a runaway non-critical feature. The gateway runs on a demo clock that",
        file=out,
    )
    print(
        "  starts yesterday at 06:00 UTC and later jumps to now, so a day of budget periods passes in a minute.",
        file=out,
    )
    print(f"\nStarting the embedded stack in {data_dir} (a previous demo's data there is replaced)", file=out)
    out.flush()
    stack_log = io.StringIO()
    stack = DevStack(
        stack_settings,
        policy=policy_path,
        out=stack_log,
        quiet_services=True,
        with_gateway=False,
        env={
            "SPENDSTREAM_PROCESSOR_ALLOWED_LATENESS_S": str(ALLOWED_LATENESS_S),
            "SPENDSTREAM_ADMIN_TOKEN": admin_token,
            "SPENDSTREAM_TIMEZONE": "UTC",  # the demo policy's: an operator's own setting would draw a warning
        },
    )
    stub = StubUpstream().start()
    clock = DemoClock(datetime.now(UTC))
    gateway_thread: GatewayThread | None = None
    emitter: RecordingEmitter | None = None
    watcher: Watcher | None = None
    try:
        try:
            stack.start()
        except RuntimeError as exc:
            raise DemoError(f"{exc}\n{stack_log.getvalue()}") from exc
        assert stack.broker is not None
        gateway_settings = load_settings(
            data_dir=data_dir, kafka_bootstrap=stack.broker.bootstrap, spool_dir=data_dir / "demo-gateway-spool"
        )
        config_path, key = write_dev_gateway_config(data_dir, stub.url)
        emitter = RecordingEmitter(Emitter(settings=gateway_settings))
        # Each call metered as soon as it is answered: the story stops its traffic at exact thresholds.
        gateway = Gateway(
            load_gateway_config(config_path),
            gateway_settings,
            emitter=emitter,
            clock=clock,
            meter_batch_s=0,  # type: ignore[arg-type]
        )
        gateway_thread = GatewayThread(gateway, stack_settings.gateway_host, stack_settings.gateway_port).start()
        watcher = Watcher(stack.broker.bootstrap)
        watcher.start()
        assert gateway.enforcer is not None
        if not gateway.enforcer.wait_ready(30) or not watcher.ready.wait(30):
            raise DemoError("the gateway could not read the enforcement topic")
        print(
            f"  broker {stack.broker.bootstrap}, processor, ledger sink + API {api}/, gateway {gateway_thread.url}/v1 "
            f"(stub upstream) - ready in {time.monotonic() - began:.0f}s",
            file=out,
            flush=True,
        )
        story = Story(out, clock, gateway_thread.url, key, gateway, emitter, watcher, policy)
        story.started = began
        asyncio.run(story.run())

        story.act(5, "The ledger: what finance sees", "from ClickHouse, through the API")
        gateway.flush_metering()
        emitter.inner.flush(30)
        lag = stack.wait_sink_caught_up(timeout=60)
        if lag:
            raise DemoError(f"{lag} usage events did not reach the ledger; see {data_dir / 'sink.log'}")
        months = sorted({e.occurred_at.date().replace(day=1) for e in emitter.events})
        lines = [{"scope": b.scope, "period": str(b.period), "limit_nanos": b.limit_nanos} for b in policy.budgets]
        for month in months:
            _api(
                f"{api}/v1/admin/budgets",
                admin_token,
                {"month": f"{month:%Y-%m}", "policy_version": policy.version, "budgets": lines},
            )
        story.say(
            f"    {len(emitter.events)} usage events in the ledger (exact, deduplicated by event_id); budgets loaded"
        )
        weekly_doc = _api(f"{api}/v1/reports/weekly?as_of={datetime.now(UTC).date()}&weeks=2", admin_token)
        story.say()
        story.say(_indent(render(report_from_json(weekly_doc), "table")))
        chargeback: dict[str, int] = defaultdict(int)
        for month in months:
            doc = _api(f"{api}/v1/reports/chargeback?month={month:%Y-%m}", admin_token)
            story.say(_indent(render(report_from_json(doc), "table")))
            for row in doc["rows"]:
                chargeback[row["department"]] += row["actual_nanos"]
        sent = emitter.by_team()
        story.say(
            "    every dollar above is a call the gateway metered: "
            + ", ".join(f"{team} {usd(sent.get(team, 0), 4)}" for team in TEAMS)
        )
        _closing(story, api, keep_running)
        summary = {
            "steps": story.steps,
            "requests": len(emitter.events),
            "sent_nanos_by_team": sent,
            "chargeback_actual_nanos_by_team": dict(chargeback),
            "weekly_spend_nanos": sum(row["spend_nanos"] or 0 for row in weekly_doc["rows"]),
            "api": api,
            "elapsed_s": round(time.monotonic() - began, 1),
        }
        if json_summary is not None:
            json_summary.write_text(json.dumps(summary, indent=2))
        if keep_running:
            dashboard = f"{api}/?token={stack.api_tokens['viewer']}"
            gateway_url = f"{gateway_thread.url}/v1"
            print(f"\nThe stack stays up: dashboard {dashboard}, gateway {gateway_url} (key {key}).", file=out)
            print("Press Enter or Ctrl-C to stop.", file=out, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                sys.stdin.readline()
        return 0
    except DemoError as exc:
        print(f"\nspendstream demo: {exc}\n  service logs: {data_dir}/*.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nspendstream demo: interrupted; stopping", file=sys.stderr)
        return 130
    finally:
        if gateway_thread is not None:
            gateway_thread.stop()
        if emitter is not None:
            emitter.inner.close(10)
        if watcher is not None:
            watcher.stopping.set()
            watcher.join(5)
        stub.stop()
        stack.stop()
        print(f"demo stopped after {time.monotonic() - began:.0f}s", file=out, flush=True)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.rstrip("\n").split("\n")) + "\n"


def _closing(story: Story, api: str, keep_running: bool) -> None:
    day = story.yesterday.date()
    say = story.say
    say()
    say("What just happened")
    say(
        "    Every call went through the gateway, which metered it into one usage event on Kafka. The processor kept\n"
        "    exact running spend per department, feature and hour (by event time), and at 80%, 90% and 100% of\n"
        f"    marketing's daily budget for {day} it published decisions (alert, fallback, shutoff) that the gateway\n"
        "    applied before the next call left: the cheaper model at 90%, a 402 naming the scope at 100%. The hourly\n"
        "    spike rule stopped the lead scorer's runaway loop and nothing else in sales. Decisions expire with their\n"
        "    period, so the new day served everyone again, and the processor confirmed it. The sink wrote every event\n"
        "    into the ClickHouse ledger, where the CFO report and the chargeback add up to the nano-dollar."
    )
    if not keep_running:
        say(
            "    See it on the dashboard: `spendstream demo --keep-running` keeps this stack up until Enter\n"
            f"    ({api}/); `spendstream dev --stub-upstream` runs the pipeline for your own calls."
        )
