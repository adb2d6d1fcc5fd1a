"""Which of a scope's windows some rule of the policy reads: the only ones stage 1 announces to stage 2.

Stage 1 keeps every scope's windows in every tracked series, so a budget added mid-period starts from the spend
the period already has. Stage 2 reads a window only through a rule (``decision_publisher.evaluate_scope``): a
budget reads its period's series, a quota the day, a daily spike rule the days and an hourly one the hours. A
scope with an allowed-model list and no such rule is announced its day window, so that stage 2 still evaluates it
when it spends and publishes the list. Before this, stage 2 merged and evaluated every window of every scope: one
ingest token naming a new user, feature, customer and project per event made twenty windows per event to merge,
store and evaluate, and the worker fell to 1,336 events/s for every team it served.

When a policy or a budget adjustment makes stage 2 read more windows, stage 1 announces their stored totals
(``StageOne.announce_newly_watched``), which is how the new rule sees the spend of the period so far.
"""

from __future__ import annotations

from spendstream.core.matching import scope_matches
from spendstream.core.periods import HOUR, period
from spendstream.core.policy import Policy
from spendstream.processor.scopes import allowed_model_lists, matching_quotas

NONE: frozenset[str] = frozenset()
_DAY = "day"
_MEMO_LIMIT = 200_000  # scopes remembered per policy; an attacker's unique names only clear the memo


def watched_series(scope: str, policy: Policy) -> frozenset[str]:
    """The window series (``core.periods.tracked_series``) that some rule of ``policy`` reads for ``scope``."""
    found = {period(budget.period).series for budget in policy.matching_budgets(scope)}
    if matching_quotas(scope, policy):
        found.add(_DAY)
    for rule in policy.spike_rules:
        if scope_matches(rule.scope, scope):
            found.add(_DAY if rule.kind == "daily" else HOUR)
    if not found and allowed_model_lists([scope], policy):
        found.add(_DAY)
    return frozenset(found) if found else NONE


def rule_footprint(policy: Policy) -> frozenset[tuple[str, str]]:
    """What decides ``watched_series``: each rule's scope pattern and the series it reads. Two policies with the same
    footprint watch the same windows (a budget adjustment that only changes a limit changes nothing here)."""
    found = {(budget.scope, period(budget.period).series) for budget in policy.budgets}
    found.update((quota.scope, _DAY) for quota in policy.quotas)
    found.update((rule.scope, _DAY if rule.kind == "daily" else HOUR) for rule in policy.spike_rules)
    found.update(("allowed_models", scope) for scope in policy.allowed_models)
    return frozenset(found)


class WatchedWindows:
    """``watched_series`` of one policy, memoised per scope (stage 1 asks once per touched window)."""

    __slots__ = ("_memo", "policy")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._memo: dict[str, frozenset[str]] = {}

    def series(self, scope: str) -> frozenset[str]:
        found = self._memo.get(scope)
        if found is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            found = self._memo[scope] = watched_series(scope, self.policy)
        return found

    def reads(self, wkey: str) -> bool:
        """Whether stage 2 reads the window ``scope|series|start``."""
        scope, series, _ = wkey.rsplit("|", 2)  # names may contain "|"
        return series in self.series(scope)


# The few policies alive at once (in force, the one it replaces), by identity.
_WATCHED: dict[int, WatchedWindows] = {}


def watched(policy: Policy) -> WatchedWindows:
    found = _WATCHED.get(id(policy))
    if found is None or found.policy is not policy:
        if len(_WATCHED) >= 8:
            _WATCHED.clear()
        found = _WATCHED[id(policy)] = WatchedWindows(policy)
    return found
