"""Where the policy places an event that does not say: the ledger's rows agree with what the processor counted.

The processor counts an event without an org or division (or, with a project, without a team) in the scopes the
policy gives its team or project, else the policy's org (``processor/scopes.hierarchy_scopes``). Edges that send
events straight to the broker (the SDK's Emitter, the API's ingest) know no policy, so the ledger's sink fills
the same names in before it writes the row; otherwise ``report top --by division`` and the FOCUS export's
billing account would put spend the division's budget counted under ``(unattributed)``. A name the event gives
is kept: the processor counts that one.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from spendstream.core.policy import Policy


def _parent(parents: tuple[str, ...], dimension: str) -> str:
    prefix = dimension + ":"
    return next((p.removeprefix(prefix) for p in parents if p.startswith(prefix)), "")


def _sql_text(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _transform(column: str, mapping: Mapping[str, str], default: str) -> str:
    """ClickHouse: ``mapping[column]``, else ``default`` (an SQL expression)."""
    pairs = sorted((k, v) for k, v in mapping.items() if v)
    if not pairs:
        return default
    keys = ", ".join(_sql_text(k) for k, _ in pairs)
    values = ", ".join(_sql_text(v) for _, v in pairs)
    return f"transform({column}, [{keys}], [{values}], {default})"


@dataclass(frozen=True)
class Placement:
    """A policy's placement of teams and projects: team -> (division, org), project -> (team, division, org)."""

    by_team: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    by_project: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    org: str = ""

    @classmethod
    def of(cls, policy: Policy | None) -> Placement:
        if policy is None:
            return NO_PLACEMENT
        by_team: dict[str, tuple[str, str]] = {}
        by_project: dict[str, tuple[str, str, str]] = {}
        for scope, parents in policy.ancestors.items():
            dimension, _, name = scope.partition(":")
            if dimension == "team":
                by_team[name] = (_parent(parents, "division"), _parent(parents, "org"))
            elif dimension == "project":
                by_project[name] = (_parent(parents, "team"), _parent(parents, "division"), _parent(parents, "org"))
        return cls(by_team, by_project, policy.org)

    def place(self, record: MutableMapping[str, Any]) -> None:
        """Fill ``record``'s empty team (from its project), division and org in place, as the processor counts it."""
        team, project = record.get("team") or "", record.get("project") or ""
        if team:
            division, org = self.by_team.get(team, ("", ""))
        elif project:
            team, division, org = self.by_project.get(project, ("", "", ""))
            record["team"] = team
        else:
            division = org = ""
        if not record.get("division"):
            record["division"] = division
        if not record.get("org"):
            record["org"] = org or self.org

    def select_sql(self) -> dict[str, str]:
        """The same filling as ClickHouse expressions over a row's ``team``, ``project``, ``division`` and ``org``
        (for rows the ledger's sink has ClickHouse decode); empty without a policy."""
        if self == NO_PLACEMENT:
            return {}
        project_team = {p: team for p, (team, _, _) in self.by_project.items()}
        team_division = {t: division for t, (division, _) in self.by_team.items()}
        project_division = {p: division for p, (_, division, _) in self.by_project.items()}
        team_org = {t: org for t, (_, org) in self.by_team.items()}
        project_org = {p: org for p, (_, _, org) in self.by_project.items()}
        policy_org, empty = _sql_text(self.org), "''"
        division = (
            f"if(team != '', {_transform('team', team_division, empty)}, "
            f"{_transform('project', project_division, empty)})"
        )
        org = (
            f"if(team != '', {_transform('team', team_org, policy_org)}, "
            f"{_transform('project', project_org, policy_org)})"
        )
        return {
            "team": f"if(team = '', {_transform('project', project_team, empty)}, team)",
            "division": f"if(division = '', {division}, division)",
            "org": f"if(org = '', {org}, org)",
        }


NO_PLACEMENT = Placement()
