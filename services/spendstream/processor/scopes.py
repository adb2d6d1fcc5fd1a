"""Which scopes a usage event belongs to, and which budgets watch a scope. Called per event, so kept cheap.

- ``scopes_for(attribution, policy) -> list[str]``: ``dimension:value`` scopes, in the order org, division, team,
  project, feature, user, customer, environment, model. Missing parents are filled from the policy hierarchy
  (a team's division and org, a project's team), so an event tagged only ``team=marketing`` also counts against
  ``division:...`` and ``org:...``. Empty attribution fields give no scope. ``model`` is read from ``model``,
  else ``model_served``, else ``model_requested``, and named by ``model_scope_name``.
- ``matching_quotas`` / ``allowed_model_lists`` do for quotas and allowed-model lists what
  ``Policy.matching_budgets`` does for budgets (a scope's own list replaces its template's); whether a model is in
  a list is ``core.matching``'s, as at the edges.
"""

from __future__ import annotations

from collections.abc import Mapping

from spendstream.core.attribution import DIRECT_FIELDS
from spendstream.core.matching import is_template, model_scope_name, template_of
from spendstream.core.policy import Policy, Quota


def scopes_for(attribution: Mapping[str, object], policy: Policy) -> list[str]:
    """Every scope of one event (team with its ancestors, project, feature, user, customer, environment, model)."""
    get = attribution.get
    out = hierarchy_scopes(get("org"), get("division"), get("team"), get("project"), policy)
    for name in DIRECT_FIELDS:
        value = get(name)
        if value:
            out.append(f"{name}:{value}")
    model = get("model") or get("model_served") or get("model_requested")
    if model:
        out.append(f"model:{model_scope_name(str(model))}")
    return out


def hierarchy_scopes(org: object, division: object, team: object, project: object, policy: Policy) -> list[str]:
    """The org, division, team and project scopes of an event, missing parents filled from the policy (the first
    scopes of ``scopes_for``; stage 1 memoises them per attribution)."""
    if team:
        parents = policy.ancestors.get(f"team:{team}", ())  # (division, org)
    elif project:
        parents = policy.ancestors.get(f"project:{project}", ())  # (team, division, org)
    else:
        parents = ()
    out: list[str] = []
    if org:
        out.append(f"org:{org}")
    else:
        inherited = [p for p in parents if p.startswith("org:")]
        out.extend(inherited or ([f"org:{policy.org}"] if policy.org else ()))
    if division:
        out.append(f"division:{division}")
    else:
        out.extend(p for p in parents if p.startswith("division:"))
    if team:
        out.append(f"team:{team}")
    else:
        out.extend(p for p in parents if p.startswith("team:"))
    if project:
        out.append(f"project:{project}")
    return out


class _Index:
    __slots__ = ("allowed", "quotas", "template_quotas")

    def __init__(self, policy: Policy) -> None:
        self.quotas: dict[str, list[Quota]] = {}
        self.template_quotas: dict[str, list[Quota]] = {}
        for q in policy.quotas:
            if is_template(q.scope):
                self.template_quotas.setdefault(q.scope.partition(":")[0], []).append(q)
            else:
                self.quotas.setdefault(q.scope, []).append(q)
        self.allowed = policy.allowed_models


# Indexes of the few policies alive at once (current and the one being replaced), by identity.
_INDEXES: dict[int, tuple[Policy, _Index]] = {}


def _index(policy: Policy) -> _Index:
    entry = _INDEXES.get(id(policy))
    if entry is None or entry[0] is not policy:
        if len(_INDEXES) >= 8:
            _INDEXES.clear()
        entry = _INDEXES[id(policy)] = (policy, _Index(policy))
    return entry[1]


def matching_quotas(scope: str, policy: Policy) -> list[Quota]:
    index = _index(policy)
    return [*index.quotas.get(scope, ()), *index.template_quotas.get(scope.partition(":")[0], ())]


def allowed_model_lists(scopes: list[str], policy: Policy) -> list[list[str]]:
    """The allowed-model lists that apply to an event's scopes (a model must be in every one of them)."""
    allowed = _index(policy).allowed
    if not allowed:
        return []
    out = []
    for scope in scopes:
        found = allowed.get(scope) or allowed.get(template_of(scope))
        if found:
            out.append(found)
    return out
