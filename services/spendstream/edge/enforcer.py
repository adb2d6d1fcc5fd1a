"""The Enforcer: follows ``spendstream.enforcement`` in a background thread and answers ``check()`` from memory.

The request path does a handful of dict lookups (one per attribution dimension that has any decision). When
some decision matches, the outcome of that set of rules for the request's model is planned once by the pure
``verdict.plan`` and kept (until a decision arrives), so a request only takes its throttles' tokens. A request
seen again (the same nine fields) is answered from what was kept of its answer, with one lookup: the verdict,
its quota counters and throttle limits, and the wall-clock range it holds in; every change of the decisions, the
policy or the hierarchy drops the kept answers. Users with no decision and no policy rule of their own share one
answer per value of the other eight fields (a ``user:*`` throttle still counts each of them): a request of a user
never seen before is answered with two lookups too.
The consumer reads the compacted topic from the beginning with no consumer group commits, so every edge holds
the full current view.

Rules that need no spend (allowed-model lists, request quotas counted at the edge: ``policy_rules``) are
applied from the policy itself, the newest valid record on ``spendstream.policy`` (``policy_follower``), so
they hold from the first request instead of after the processor has seen traffic.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from fractions import Fraction
from itertools import count
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from spendstream.core.attribution import DIMENSIONS
from spendstream.core.codec import AvroCodec, DecodeError
from spendstream.core.config import Settings, load_settings
from spendstream.core.events import Action, Decision, Heartbeat
from spendstream.core.matching import model_scope_name
from spendstream.core.policy import Policy
from spendstream.core.record_signature import RecordVerifier, vouched_for
from spendstream.core.topics import ENFORCEMENT, HEARTBEAT_KEY_PREFIX, POLICY
from spendstream.edge.policy_follower import PolicyFollower
from spendstream.edge.policy_rules import HardCaps, StaticRules
from spendstream.edge.reservation import Refusal, Reservation, ReservationBook
from spendstream.edge.topic_follower import follow_with_retries, topic_partitions
from spendstream.edge.verdict import (
    ALLOW,
    BLOCKING_STATUS,
    UNAVAILABLE,
    Plan,
    RateLimit,
    ScopeRule,
    Verdict,
    newer,
    parse_scope,
    plan,
    resolve_many,
    take,
    take_all,
    throttled,
    throttles_of,
)

log = logging.getLogger(__name__)

# The order of check()'s dimensions; a scope's dimension must be one of these (or the global "*").
_DIM_INDEX = {dim: i for i, dim in enumerate(DIMENSIONS)}
_FEATURE = _DIM_INDEX["feature"]
_TEAM = _DIM_INDEX["team"]
_USER = _DIM_INDEX["user"]
_MODEL = _DIM_INDEX["model"]
# In the key of an answer kept for every user with no rule and no policy rule of its own (``_shared_answer_key``):
# the user's place; in its throttles, the key of the ``user:*`` limit, which counts each user on its own.
_ANY_USER: Any = object()
WILDCARD = "*"
# Plans kept per Enforcer (matched rules and model -> outcome), answers per request, allow verdicts per model;
# each emptied when full.
_MAX_PLANS = 8192
_INF = math.inf
# What check() keeps per request (its nine fields): the verdict when no throttle refuses and no quota is used up,
# whether it only holds in [valid_from, valid_until) of the wall clock (rules that expire, or quotas counted today),
# the quota counters to count, as (dimension index, cap, counter), and the throttles' (rule, limited value) to count on.
_Answer = tuple[
    Verdict, bool, float, float, tuple[tuple[int, int, "count[int]"], ...], tuple[tuple[ScopeRule, str], ...]
]
# Hashes of requests seen once, by their low bits: an answer is kept when its request comes again.
_SEEN_SLOTS = 4096
_SEEN_MASK = _SEEN_SLOTS - 1


def _count(counted: tuple[tuple[int, int, count[int]], ...]) -> list[tuple[int, int, int]]:
    """Count one request on each of its quota counters; (dimension index, count, cap) of those at their cap."""
    refused = []
    for i, cap, counter in counted:
        used = next(counter)
        if used >= cap:
            refused.append((i, used, cap))
    return refused


class Enforcer:
    """Local, always-answering view of the enforcement decisions.

    ``hierarchy`` maps a scope to its parent (``{"team:web": "division:eng", "division:eng": "org:acme"}``),
    so a request that names only its team is also held to its division's and org's decisions.
    Without ``bootstrap_servers`` or ``settings``, the ``SPENDSTREAM_*`` settings are read.
    Fail-open by default: with no fresh view the last known decisions still apply. With ``fail_closed``,
    requests are refused (``unavailable``) while ``staleness_s`` exceeds ``max_staleness_s``: before the view is
    ready, while the broker is unreachable, and while no processor proves it is alive (heartbeats).
    ``clock`` (aware datetimes) is what decisions' ``expires_at`` are compared with; it defaults to the real
    time, and a gateway replaying a past day (the demo) passes its own.
    ``policy`` (e.g. the ``SPENDSTREAM_POLICY`` file) is in force until a policy is read from ``policy_topic``;
    ``policy_topic=None`` applies ``policy`` alone. Without an explicit ``hierarchy``, the policy's is used.
    ``budget_share`` is the part of a scope's remaining budget this edge may reserve (``reserve``): 1/G for each of
    G edges (gateway processes) that serve the same scopes.
    ``verifier`` (default: the settings' ``verify_key``) makes the edge apply only decisions, heartbeats and
    policies signed with its key pair's private key: a client that may write to the broker cannot lift a shutoff.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: Settings | None = None,
        fail_closed: bool = False,
        max_staleness_s: float = 30.0,
        hierarchy: Mapping[str, str] | None = None,
        topic: str = ENFORCEMENT,
        poll_interval_s: float = 0.05,
        clock: Callable[[], datetime] | None = None,
        policy: Policy | None = None,
        policy_topic: str | None = POLICY,
        budget_share: Fraction = Fraction(1),
        verifier: RecordVerifier | None = None,
    ) -> None:
        if settings is None and bootstrap_servers is None:
            settings = load_settings()
        if verifier is None:  # the settings' verify key, also when only the broker's address was given
            verifier = (settings or load_settings()).record_verifier()
        self._verifier = verifier
        if verifier is None:
            log.warning(
                "decisions on %s are applied unverified: a client that may write to it could lift a shutoff; set "
                "SPENDSTREAM_VERIFY_KEY (docs/architecture.md, signed records)",
                topic,
            )
        conf: dict[str, Any] = settings.kafka_client_config() if settings is not None else {}
        if bootstrap_servers:
            conf["bootstrap.servers"] = bootstrap_servers
        self._conf = {
            **conf,
            "group.id": f"spendstream-enforcer-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            "topic.metadata.refresh.interval.ms": 10_000,
        }
        registry = settings.schema_registry_url if settings is not None else None
        self._codec = AvroCodec("decision", registry)
        self._heartbeat_codec = AvroCodec("heartbeat", registry)
        self._topic = topic
        self._poll_interval_s = poll_interval_s
        self._wall: Callable[[], float] = time.time if clock is None else (lambda: clock().timestamp())
        self.fail_closed = fail_closed
        self.max_staleness_s = max_staleness_s
        # dimension index -> {value or "*": rule}; _active lists the dimensions with rules, as
        # (index, its rules, its wildcard rule or None), so check() does one lookup per such dimension.
        self._rules: dict[str, ScopeRule] = {}
        self._index: list[dict[str, ScopeRule]] = [{} for _ in DIMENSIONS]
        self._active: tuple[tuple[int, dict[str, ScopeRule], ScopeRule | None], ...] = ()
        self._global: ScopeRule | None = None
        self._ancestors: dict[tuple[int, str], tuple[tuple[int, str], ...]] = {}
        self._exempting: set[str] = set()  # scopes whose shutoff throttles critical features instead
        self.reservations = ReservationBook(budget_share)
        self._book_lock = threading.Lock()  # decisions update the book from the consumer thread
        # (scope, critical feature) -> its throttle past an ordinary budget of the scope this edge has used up
        self._critical_paces: dict[tuple[str, str], RateLimit] = {}
        # (model, *matched rules) -> Plan: rules are immutable once installed (only their limits' counts change), so a
        # plan stays right for as long as its rules are matched; emptied when a decision arrives to free old rules.
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._allow: dict[str, Verdict] = {}  # model -> its allow verdict, shared: nothing allocated to allow
        # request (its nine fields) -> its answer; replaced by every change of the rules, the policy or the hierarchy
        # (after the change is installed), so an answer is only ever kept from the rules in force.
        self._answers: dict[tuple[Any, ...], _Answer] = {}
        self._seen_once: list[int] = [0] * _SEEN_SLOTS  # only decides what is kept, so never emptied
        # The users with a decision of their own (and "*"), while no policy rule names a user: the others share their
        # answers (``_shared_answer_key``). None: a policy quota or model list is per user, so nobody shares.
        self._shared_users: dict[str, ScopeRule] | None = self._index[_USER]
        self.set_hierarchy(hierarchy or {})
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fresh_at: float | None = None
        self._alive_at: float | None = None  # epoch seconds of the newest processor heartbeat read
        self._ready_at: float | None = None  # monotonic seconds when the view was first complete
        self._stale_reported = False  # the log says the view is stale (until it says it is fresh again)
        self.processor_policy_version = ""  # the policy version that heartbeat reported
        self.policy: Policy | None = None  # the policy in force at this edge (the newest valid one read)
        self.stats = {
            "decisions": 0, "tombstones": 0, "stale_versions": 0, "bad_records": 0, "unsigned": 0, "errors": 0,
        }  # fmt: skip
        self._unsigned_logged_at = float("-inf")
        # The policy's own rules (None: no policy, or one with no such rule).
        self._static: StaticRules | None = None
        self._hierarchy_from_policy = hierarchy is None
        if policy is not None:
            self.set_policy(policy)
        self._policy_follower = (
            PolicyFollower(conf, self.set_policy, topic=policy_topic, schema_registry_url=registry, verifier=verifier)
            if policy_topic is not None
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Enforcer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spendstream-enforcer", daemon=True)
            self._thread.start()
        if self._policy_follower is not None:
            self._policy_follower.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the decisions up to the high watermarks seen at start are loaded (and the policy topic read)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._ready.wait(timeout):
            return False
        if self._policy_follower is None:
            return True
        return self._policy_follower.wait_ready(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and (self._policy_follower is None or self._policy_follower.ready)

    def stop(self, timeout: float = 5.0) -> None:
        if self._policy_follower is not None:
            self._policy_follower.stop(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Enforcer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def staleness_s(self) -> float:
        """How old the view may be: seconds since a processor last proved it was alive (the newest heartbeat this
        edge has read) or since the view was last known to be complete, whichever is longer. Infinite before
        both happened. Heartbeat ages compare the processor's clock with this host's (keep clocks in sync)."""
        if self._fresh_at is None or self._alive_at is None:
            return float("inf")
        return max(time.monotonic() - self._fresh_at, time.time() - self._alive_at, 0.0)

    # -- the request path ------------------------------------------------------------------------
    def check(
        self,
        *,
        team: str = "",
        project: str = "",
        feature: str = "",
        user: str = "",
        customer: str = "",
        environment: str = "",
        model: str = "",
        org: str = "",
        division: str = "",
    ) -> Verdict:
        """The verdict for one request, from memory. Never blocks, never touches the network.

        Safe from many threads (the gateway's event loop, SDK clients): each dict or list read and write is atomic
        under the GIL, rules and kept answers are replaced rather than changed, and a request is counted under the lock
        of its throttle's limit (one per rule, not one per user)."""
        if self.fail_closed and self.staleness_s > self.max_staleness_s:
            return Verdict(UNAVAILABLE, model, 1.0, "enforcement view is stale or no processor is alive", "")
        answers = self._answers  # read before any rule: a change replaces it after installing the new rules
        request = (org, division, team, project, feature, user, customer, environment, model)
        kept = answers.get(request)
        if kept is None:
            shared = self._shared_users
            if not user or shared is None or user in shared:
                return self._check_and_keep(answers, request, None, None)
            kept = answers.get((org, division, team, project, feature, _ANY_USER, customer, environment, model))
            if kept is None:
                return self._check_and_keep(answers, request, None, None)
        verdict, timed, valid_from, valid_until, counted, throttles = kept
        if timed:
            wall = self._wall()
            if not valid_from <= wall < valid_until:
                return self._check_and_keep(answers, request, wall, None)
            if counted:
                refused = []
                for i, cap, counter in counted:  # _count, inline: on every request of a quota scope
                    used = next(counter)
                    if used >= cap:
                        refused.append((i, used, cap))
                if refused:
                    return self._check_and_keep(answers, request, wall, refused)
        if throttles:
            now = time.monotonic()
            if len(throttles) == 1:  # inline: the common throttled-but-allowed request
                limiting, key = throttles[0]
                wait = limiting.limit.try_take(user if key is _ANY_USER else key, now)
            else:
                wait, limiting = take_all([(rule, user if key is _ANY_USER else key) for rule, key in throttles], now)
            if wait > 0.0:
                return throttled(verdict.model, limiting, wait)
        return verdict

    def _check_and_keep(
        self,
        answers: dict[tuple[Any, ...], _Answer],
        request: tuple[str, ...],
        wall: float | None,
        refused: list[tuple[int, int, int]] | None,
    ) -> Verdict:
        """``check`` from the rules, for a request with no answer kept (or one that no longer holds); keeps the
        answer for the next identical request when it holds for a while. ``refused``: the request's quota counts
        already taken, that reached their cap (None: not counted yet)."""
        first_seen = wall is None  # check() found no answer kept (not one that no longer holds)
        shared_key = self._shared_answer_key(request)
        user_at = -1  # where the user:* rule is among the matched rules (its limit's key is the user)
        model = request[-1]
        values: Sequence[str] = request
        if self._ancestors or model:
            values = list(request)
            values[_MODEL] = model_scope_name(model) if model else ""  # the rules' name of it: ``model:gpt-4o``
            if self._ancestors:
                self._fill_ancestors(values)
        # The matched rules and the values their limits count (a wildcard rule: the matched value; an exact one: "").
        rules: list[ScopeRule] = []
        keys: list[str] = []
        static = self._static
        quotas = static.quotas if static is not None else None
        counted: tuple[tuple[int, int, count[int]], ...] = ()
        if quotas is not None:
            if wall is None:
                wall = self._wall()
            if refused is None:
                counted = quotas.scopes(values, wall)
                refused = _count(counted)
            if refused:
                rules = [quotas.refusal(i, values[i], used, cap) for i, used, cap in refused]
                keys = [""] * len(rules)
        for i, by_value, wildcard in self._active:
            value = values[i]
            if value:
                rule = by_value.get(value)
                if rule is not None:
                    rules.append(rule)
                    keys.append("")
                if wildcard is not None:
                    if i == _USER:
                        user_at = len(rules)
                    rules.append(wildcard)
                    keys.append(value)
        if self._global is not None:
            rules.append(self._global)
            keys.append("")
        throttles: tuple[tuple[ScopeRule, str], ...] = ()
        planned: Plan | None = None
        if not rules:
            valid_from, valid_until = -_INF, _INF
            verdict = base = self._allow.get(model) or self._allow_verdict(model)
        else:
            feature = values[_FEATURE]
            if feature and self._exempting and self._may_name(values[_TEAM], feature):
                rules = [rule.for_feature(feature) if rule.critical else rule for rule in rules]
            signature = (model, *rules)
            kept = self._plans.get(signature)
            if kept is None or kept[4]:  # none kept, or one that holds for a while: plan again if it lapsed
                if wall is None:
                    wall = self._wall()
                kept = self._plan(signature, kept, wall)
                if kept is None:  # an expiring shutoff: its retry-after changes with the clock
                    return resolve_many(zip(rules, keys, strict=True), model, wall, time.monotonic())
            planned = kept
            valid_from, valid_until, base, positions, _ = kept
            verdict = base
            if positions:
                now = time.monotonic()
                if len(positions) == 1:  # inline take(): the common throttled-but-allowed request
                    position = positions[0]
                    limiting = rules[position]
                    throttles = ((limiting, keys[position]),)
                    wait = limiting.limit.try_take(keys[position], now)
                    if wait > 0.0:
                        verdict = throttled(base.model, limiting, wait)
                else:
                    throttles = throttles_of(kept, rules, keys)
                    verdict = take(base, throttles, now)
        if static is not None and static.allowed and base.action not in BLOCKING_STATUS:
            denied = static.denial(values, base.model)
            if denied is not None:
                base = denied
                if verdict.action not in BLOCKING_STATUS:
                    verdict = denied
        if first_seen:
            # Kept from the second time it is seen: a stream of requests that each come once (more users than
            # answers kept) then costs a hash per request, with nothing kept alive, no dict growing or emptied.
            digest = hash(request if shared_key is None else shared_key)
            seen_once = self._seen_once
            slot = digest & _SEEN_MASK
            if seen_once[slot] != digest:
                seen_once[slot] = digest
                return verdict
        if not refused:  # a used-up quota's refusal counts down to midnight: never kept
            if quotas is not None and counted:
                valid_until = min(valid_until, quotas.day_end)  # the counters are today's
            if len(answers) >= _MAX_PLANS:
                answers.clear()
            timed = valid_from != -_INF or valid_until != _INF
            if shared_key is None:
                answers[request] = (base, timed, valid_from, valid_until, counted, throttles)
            else:
                if throttles and user_at >= 0 and planned is not None:
                    keys[user_at] = _ANY_USER
                    throttles = throttles_of(planned, rules, keys)
                answers[shared_key] = (base, timed, valid_from, valid_until, counted, throttles)
        return verdict

    def _shared_answer_key(self, request: tuple[str, ...]) -> tuple[Any, ...] | None:
        """The key of the answer ``request`` shares with every user like its own (None: its user has a decision or
        a policy rule of its own, or it names no user). Their answers differ only in which user a ``user:*`` throttle
        counts: the key of that limit is ``_ANY_USER`` in the kept answer, and ``check`` puts the user there."""
        shared = self._shared_users
        user = request[_USER]
        if not user or shared is None or user in shared:
            return None
        return (*request[:_USER], _ANY_USER, *request[_USER + 1 :])

    def _plan(self, signature: tuple[Any, ...], kept: Plan | None, wall: float) -> Plan | None:
        """``kept``, the plan of ``signature`` (model, *rules), if it holds at ``wall``, else a new one (None: none
        holds: an expiring shutoff)."""
        if kept is None or not kept.valid_from <= wall < kept.valid_until:
            kept = plan(signature[1:], signature[0], wall)
            if kept is None:
                return None
            plans = self._plans
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plans[signature] = kept
        return kept

    def _allow_verdict(self, model: str) -> Verdict:
        if len(self._allow) >= _MAX_PLANS:
            self._allow.clear()
        verdict = self._allow[model] = Verdict(ALLOW, model)
        return verdict

    def _fill_ancestors(self, values: list[str]) -> None:
        for i in (_DIM_INDEX["project"], _DIM_INDEX["team"], _DIM_INDEX["division"]):
            if values[i]:
                for dim_i, value in self._ancestors.get((i, values[i]), ()):
                    if not values[dim_i]:
                        values[dim_i] = value

    # -- exact reservation -----------------------------------------------------------------------
    def reserve(
        self,
        estimate: Callable[[], int],
        *,
        team: str = "",
        project: str = "",
        feature: str = "",
        user: str = "",
        customer: str = "",
        environment: str = "",
        model: str = "",
        org: str = "",
        division: str = "",
    ) -> Reservation | Refusal:
        """Hold a request's estimated cost (``estimate()`` nanos, asked only when one of its scopes has a known
        budget) against the remaining budget of each of its scopes; else why the first scope it would overdraw is
        refused (``Refusal``).
        Every admitted request is ``settle``d with its real cost once known (0 if it cost nothing)."""
        values = [org, division, team, project, feature, user, customer, environment, model and model_scope_name(model)]
        if self._ancestors:
            self._fill_ancestors(values)
        scopes = tuple(f"{DIMENSIONS[i]}:{value}" for i, value in enumerate(values) if value)
        policy = self.policy
        critical = (
            bool(feature) and policy is not None and policy.is_critical(feature) and self._may_name(team, feature)
        )
        with self._book_lock:
            held = self.reservations.reserve(scopes, estimate, self._wall(), critical)
            if isinstance(held, Refusal) or held.exhausted is None or policy is None:
                return held
            # A critical feature past an ordinary budget this edge has used up: throttled at the policy's rate until
            # the processor's shutoff (which lists the same rate) arrives.
            key, rate = (held.exhausted, feature), policy.throttle_rps(feature)
            pace = self._critical_paces.get(key)
            if pace is None or pace.rate != rate:  # a new policy may have changed the feature's rate
                pace = self._critical_paces[key] = RateLimit(rate)
            wait = pace.try_take(feature, time.monotonic())
            if wait <= 0:
                return held
            self.reservations.release(held)
            return self.reservations.refusal(held.exhausted, pace.rate, wait)

    def settle(self, reservation: Reservation, cost_nanos: int) -> None:
        with self._book_lock:
            self.reservations.settle(reservation, cost_nanos, self._wall())

    # -- the policy's own rules ------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Apply ``policy``'s allowed-model lists and request quotas from now on (today's counts carry over)."""
        if self._hierarchy_from_policy:
            self.set_hierarchy(policy.parent_scopes)
        static = StaticRules(policy, DIMENSIONS, self._static)
        self._static = static if static else None
        caps = HardCaps(policy)
        with self._book_lock:
            self.reservations.set_caps(caps if caps else None, policy.version)
        self._shared_users = None if static.names(_USER) else self._index[_USER]
        self._answers = {}
        self.policy = policy
        log.info("enforcer applies policy %s %s", policy.name, policy.version)

    def requests_counted(self, scope: str) -> int:
        """Requests counted today at this edge against the request quota of ``scope`` (``user:u1``)."""
        static = self._static
        return static.quotas.used(scope) if static is not None and static.quotas is not None else 0

    # -- the view --------------------------------------------------------------------------------
    def set_hierarchy(self, hierarchy: Mapping[str, str]) -> None:
        """Replace the scope -> parent map (e.g. from the policy); cycles are cut, unknown dimensions refused."""
        parents = {}
        for child, parent in hierarchy.items():
            (cdim, cval), (pdim, pval) = parse_scope(child), parse_scope(parent)
            if cdim not in _DIM_INDEX or pdim not in _DIM_INDEX:
                raise ValueError(f"hierarchy {child} -> {parent}: unknown dimension")
            parents[(_DIM_INDEX[cdim], cval)] = (_DIM_INDEX[pdim], pval)
        chains = {}
        for start in parents:
            chain, node, seen = [], parents[start], {start}
            while node is not None and node not in seen:
                chain.append(node)
                seen.add(node)
                node = parents.get(node)
            chains[start] = tuple(chain)
        self._ancestors = chains
        self._answers = {}

    def apply(self, scope: str, decision: Decision | None) -> bool:
        """Install (or, with None, delete) the decision of one scope; False if ignored as stale or invalid."""
        try:
            dim, value = parse_scope(scope)
        except ValueError:
            self.stats["bad_records"] += 1
            log.warning("ignoring decision with malformed scope %r", scope)
            return False
        if dim != "*" and dim not in _DIM_INDEX:
            self.stats["bad_records"] += 1
            log.warning("ignoring decision for unknown dimension %r", scope)
            return False
        if decision is None:
            self.stats["tombstones"] += 1
            with self._book_lock:
                self.reservations.forget(scope)
            self._rules.pop(scope, None)
            self._exempting.discard(scope)
            self._install(dim, value, None)
            return True
        rule = ScopeRule.from_decision(decision)
        current = self._rules.get(scope)
        if not newer(current, rule):
            self.stats["stale_versions"] += 1
            return False
        self._rules[scope] = rule
        with self._book_lock:
            # A plain allow (a lifted alert) says where one budget stood, but no more will come while the scope stays
            # below its alert: only decisions refreshed while the scope has traffic (its alert, its fallback, a hard
            # cap's allow, which has a period end) keep a ledger right, so only they open one.
            if (
                decision.limit_nanos > 0
                and decision.issued_at is not None
                and (decision.action is not Action.allow or decision.expires_at is not None)
            ):
                issued_at = decision.issued_at.timestamp()
                expires_at = decision.expires_at.timestamp() if decision.expires_at is not None else None
                self.reservations.observe(
                    scope,
                    decision.spend_nanos,
                    decision.limit_nanos,
                    issued_at,
                    expires_at,
                    decision.period or "",
                    decision.policy_version or "",
                )
            else:
                self.reservations.forget(scope)
        self.stats["decisions"] += 1
        if current is not None and rule.same_effect(current):
            # A refresh (a budget's spend every few seconds): the rule in force stays, with its throttle's counts,
            # and the answers and plans built on it are kept; only its reason says where the spend is now.
            current.version, current.reason = rule.version, rule.reason
            self._rules[scope] = current
            return True
        if rule.critical:
            self._exempting.add(scope)
        else:
            self._exempting.discard(scope)
        # An allow with no model list changes no answer (a hard cap's standing is for the reservation book alone):
        # the scope is left out of the index, so its requests keep sharing the answers of scopes without a rule.
        no_effect = rule.action == ALLOW and rule.allowed is None
        if not (no_effect and current is None):
            self._install(dim, value, None if no_effect else rule)
        return True

    def _install(self, dim: str, value: str, rule: ScopeRule | None) -> None:
        # Each assignment is atomic under the GIL, so check() sees either the old or the new rule.
        if dim == "*":
            self._global = rule
            self._plans = {}
            self._answers = {}
            return
        i = _DIM_INDEX[dim]
        if rule is None:
            self._index[i].pop(value, None)
        else:
            self._index[i][value] = rule
        self._active = tuple((j, rules, rules.get(WILDCARD)) for j, rules in enumerate(self._index) if rules)
        self._plans = {}
        self._answers = {}

    def decisions(self) -> dict[str, ScopeRule]:
        """The rules in force, by scope (a copy, for diagnostics)."""
        return dict(self._rules)

    # -- the consumer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        follow_with_retries(self._conf, self._follow, self._stop, self._on_consumer_error)

    def _on_consumer_error(self, exc: KafkaException) -> None:
        self.stats["errors"] += 1
        log.warning("enforcement consumer: %s; retrying", exc)

    def _follow(self, consumer: Consumer) -> None:
        partitions = topic_partitions(consumer, self._topic, self._stop)
        if partitions is None:
            return
        marks = {p: consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=2) for p in partitions}
        high_at_start = {p: high for p, (_, high) in marks.items()}
        next_offset = {p: low for p, (low, _) in marks.items()}
        consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
        last_probe = 0.0
        highs = dict(high_at_start)
        while not self._stop.is_set():
            messages = consumer.consume(num_messages=1000, timeout=self._poll_interval_s)
            for msg in messages:
                if msg.error() is not None:
                    continue
                next_offset[msg.partition()] = msg.offset() + 1
                key, value = msg.key(), msg.value()
                if vouched_for(self._verifier, self._topic, msg):
                    self._on_message(key, value)
                else:
                    self._refuse_unsigned(key)
            # Ready at the watermarks seen at start and with nothing more to read right now (some brokers
            # report a watermark that lags the last batch they acknowledged).
            if (
                not self._ready.is_set()
                and not messages
                and all(next_offset[p] >= high_at_start[p] for p in partitions)
            ):
                self._fresh_at = self._ready_at = time.monotonic()
                self._ready.set()
                log.info("enforcer ready: %d scopes with decisions", len(self._rules))
            now = time.monotonic()
            if now - last_probe >= 0.5:
                last_probe = now
                self._report_staleness()
                try:
                    for p in partitions:
                        highs[p] = consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=1)[1]
                except KafkaException:
                    continue  # broker unreachable: the view ages, staleness_s says by how much
                if all(next_offset[p] >= highs[p] for p in partitions):
                    self._fresh_at = now

    def _report_staleness(self) -> None:
        """One warning when the view turns stale (``staleness_s`` past ``max_staleness_s``: no processor heartbeat,
        or the topic not read to its end) and one when it is fresh again, so that an edge serving on old decisions
        says so in its log, not only in a metric. Quiet for ``max_staleness_s`` after the view is first complete,
        while a processor that starts with it has not beaten yet."""
        if self._ready_at is None or time.monotonic() - self._ready_at < self.max_staleness_s:
            return
        staleness = self.staleness_s
        stale = staleness > self.max_staleness_s
        if stale == self._stale_reported:
            return
        self._stale_reported = stale
        if stale:
            age = "no processor heartbeat yet" if staleness == float("inf") else f"{staleness:.0f} s old"
            then = "requests get 503 (fail-closed)" if self.fail_closed else "requests are served (fail-open)"
            log.warning(
                "enforcement view stale (%s, limit %.0f s): no processor is confirming decisions; %s",
                age, self.max_staleness_s, then,
            )  # fmt: skip
        else:
            log.warning("enforcement view fresh again: a processor heartbeat %.1f s ago", staleness)

    def _may_name(self, team: str, feature: str) -> bool:
        """Whether a call of ``team`` gets what ``feature`` is given (a critical feature's throttle instead of a
        shutoff): not when the policy gives the feature to other teams."""
        policy = self.policy
        return policy is None or policy.feature_owner_problem(team, feature) is None

    def _refuse_unsigned(self, key: bytes | None) -> None:
        """A record the verify key does not vouch for is not applied: counted, and logged at most once a minute."""
        self.stats["unsigned"] += 1
        now = time.monotonic()
        if now - self._unsigned_logged_at >= 60.0:
            self._unsigned_logged_at = now
            log.error(
                "ignoring a record on %s that is not signed with the processor's key (key %r; %d so far): a client "
                "that may write to the topic tried to forge a decision, or the processor has no signing key",
                self._topic, key, self.stats["unsigned"],
            )  # fmt: skip

    def _on_message(self, key: bytes | None, value: bytes | None) -> None:
        if key is not None and key.startswith(HEARTBEAT_KEY_PREFIX):
            self._on_heartbeat(value)
            return
        if value is None:
            if key:
                self.apply(key.decode("utf-8", "replace"), None)
            return
        try:
            decision = Decision.from_avro(self._codec.decode(value))
        except (DecodeError, ValueError) as exc:
            self.stats["bad_records"] += 1
            log.warning("ignoring undecodable decision (key %r): %s", key, exc)
            return
        self.apply(decision.scope, decision)

    def _on_heartbeat(self, value: bytes | None) -> None:
        if value is None:
            return  # a worker that stopped cleanly deleted its key
        try:
            beat = Heartbeat.from_avro(self._heartbeat_codec.decode(value))
        except (DecodeError, ValueError) as exc:
            self.stats["bad_records"] += 1
            log.warning("ignoring undecodable processor heartbeat: %s", exc)
            return
        at = beat.issued_at.timestamp()
        self.reservations.standing_known = True  # hard caps may open from the policy: the processor has reported
        if self._alive_at is None or at >= self._alive_at:
            self._alive_at = at
            self.processor_policy_version = beat.policy_version
