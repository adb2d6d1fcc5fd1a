"""Scope resolution per event and budget/quota/allowed-model matching, including templates."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from spendstream.core.matching import model_scope_name
from spendstream.core.policy import load_policy, parse_policy
from spendstream.processor.scopes import allowed_model_lists, matching_quotas, scopes_for

DEFAULT = load_policy(Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml")
HIER = parse_policy(
    """
org: acme
divisions: {rnd: [engineering]}
projects: {reviewer: engineering}
budgets:
  - {scope: "user:*", period: day, amount_usd: 20}
  - {scope: "user:vip", period: day, amount_usd: 200}
  - {scope: "team:engineering", amount_usd: 100}
quotas:
  - {scope: "user:*", requests_per_day: 50}
  - {scope: "user:bot", requests_per_day: 5000}
allowed_models:
  "environment:development": [llama-3.2-1b]
  "team:*": [gpt-4o, gpt-4o-mini, llama-3.2-1b]
"""
)


def test_team_brings_its_division_and_org() -> None:
    event = {"team": "engineering", "feature": "ai_code_review", "user": "u1", "model_requested": "gpt-4o"}
    assert scopes_for(event, HIER) == [
        "org:acme",
        "division:rnd",
        "team:engineering",
        "feature:ai_code_review",
        "user:u1",
        "model:gpt-4o",
    ]


def test_project_alone_resolves_its_team() -> None:
    assert scopes_for({"project": "reviewer", "environment": "prod"}, HIER) == [
        "org:acme",
        "division:rnd",
        "team:engineering",
        "project:reviewer",
        "environment:prod",
    ]


def test_explicit_attribution_wins_and_empty_fields_are_skipped() -> None:
    event = {"org": "other", "division": "x", "team": "engineering", "user": "", "customer": "c9", "model": "m"}
    assert scopes_for(event, HIER) == ["org:other", "division:x", "team:engineering", "customer:c9", "model:m"]


def test_unknown_team_gets_policy_org_only() -> None:
    assert scopes_for({"team": "newteam"}, HIER) == ["org:acme", "team:newteam"]
    assert scopes_for({}, parse_policy("{}")) == []


def test_reference_policy_marketing_scopes() -> None:
    assert scopes_for({"team": "marketing", "feature": "ai_chatbot"}, DEFAULT)[:4] == [
        "org:acme",
        "division:go_to_market",
        "team:marketing",
        "feature:ai_chatbot",
    ]


def test_templates_give_every_value_a_budget() -> None:
    assert [b.limit_nanos for b in HIER.matching_budgets("user:vip")] == [200 * 10**9, 20 * 10**9]
    assert [b.scope for b in HIER.matching_budgets("user:anyone")] == ["user:*"]
    assert [b.scope for b in HIER.matching_budgets("team:engineering")] == ["team:engineering"]
    assert HIER.matching_budgets("feature:x") == []


def test_quota_templates() -> None:
    assert [q.requests_per_day for q in matching_quotas("user:bot", HIER)] == [5000, 50]
    assert [q.requests_per_day for q in matching_quotas("user:u1", DEFAULT)] == [50]
    assert matching_quotas("team:a", DEFAULT) == []


def test_allowed_model_lists_apply_per_scope() -> None:
    scopes = scopes_for({"team": "engineering", "environment": "development"}, HIER)
    assert allowed_model_lists(scopes, HIER) == [["gpt-4o", "gpt-4o-mini", "llama-3.2-1b"], ["llama-3.2-1b"]]
    assert allowed_model_lists(["user:x"], HIER) == []


names = st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=8)


@given(team=names, feature=names, user=names, customer=names, environment=names, model=names)
def test_every_non_empty_field_yields_exactly_one_scope(
    team: str, feature: str, user: str, customer: str, environment: str, model: str
) -> None:
    event = {"team": team, "feature": feature, "user": user, "customer": customer, "environment": environment}
    event["model_requested"] = model
    scopes = scopes_for(event, HIER)
    for dim, value in [*event.items()]:
        if dim == "model_requested":  # a model's scope is named by model_scope_name (``GPT4O`` -> ``gpt4o``)
            dim, value = "model", model_scope_name(value) if value else value
        assert scopes.count(f"{dim}:{value}") == (1 if value else 0)
    assert all(s.partition(":")[2] for s in scopes)
