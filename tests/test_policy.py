"""Policy parsing: conversions to nanos, defaults, and errors that name file, line and field."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from spendstream.core.policy import PolicyError, load_policy, parse_policy, policy_from_json

DEFAULT = Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml"


def test_reference_policy_matches_the_scenario() -> None:
    policy = load_policy(DEFAULT)
    budgets = {b.scope: b for b in policy.budgets}
    assert budgets["team:engineering"].limit_nanos == 12_000 * 10**9
    assert sum(b.limit_nanos for s, b in budgets.items() if s.startswith("team:")) == 35_000 * 10**9
    assert budgets["feature:ai_lead_scorer"].limit_nanos == 2_000 * 10**9
    assert all(b.period == "month" for b in policy.budgets)
    t = budgets["team:marketing"].thresholds
    assert (t.alert, t.fallback, t.shutoff) == (Decimal("0.80"), Decimal("0.90"), Decimal("1.00"))
    assert budgets["team:marketing"].fallback_models["gpt-4o"] == "gpt-4o-mini"
    assert policy.quotas[0].scope == "user:*" and policy.quotas[0].requests_per_day == 50
    assert policy.spike_rules[0].factor == 3 and policy.spike_rules[0].action == "emergency_stop"
    assert policy.allowed_models["environment:development"]
    assert policy.is_critical("ai_chatbot") and not policy.is_critical("ai_lead_scorer")
    assert policy.price_table.override_for("local", "llama-3.2-1b", datetime(2025, 6, 1, tzinfo=UTC)) is not None


def test_human_amounts_become_exact_nanos() -> None:
    policy = parse_policy(
        "budgets:\n  - {scope: 'user:*', period: day, amount_usd: 0.1}\n  - {scope: 'team:a', amount_nanos: 7}\n"
    )
    assert [b.limit_nanos for b in policy.budgets] == [100_000_000, 7]


def test_per_budget_threshold_override_keeps_other_defaults() -> None:
    policy = parse_policy(
        "thresholds: {alert: 0.5}\nbudgets:\n  - scope: team:a\n    amount_usd: 1\n"
        "    thresholds: {alert: 0.7, fallback: null}\n"
    )
    t = policy.budgets[0].thresholds
    assert (t.alert, t.fallback, t.shutoff) == (Decimal("0.7"), None, Decimal("1.00"))


def test_version_is_a_content_hash_ignoring_layout() -> None:
    a = parse_policy("budgets:\n  - {scope: 'team:a', amount_usd: 5}\n")
    b = parse_policy("# comment\nbudgets:\n  - scope: team:a\n    amount_usd: 5\n")
    c = parse_policy("budgets:\n  - {scope: 'team:a', amount_usd: 6}\n")
    assert a.version == b.version != c.version
    assert len(a.version) == 16


def test_json_round_trip_keeps_version() -> None:
    policy = load_policy(DEFAULT)
    again = policy_from_json(policy.to_json())
    assert again.version == policy.version and again == policy


def test_summary_lists_budgets() -> None:
    text = load_policy(DEFAULT).summary()
    assert "team:engineering" in text and "$12,000.00" in text and "ai_chatbot" in text


BAD = """\
timezone: UTC
budgets:
  - scope: team:a
    amount_usd: 10
  - scope: team:b
    period: fortnight
    amount_usd: 5
"""


def test_error_names_file_line_and_field() -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(BAD, "bad.yaml")
    assert exc.value.problems == [
        "bad.yaml:6: budgets.1.period: Input should be 'day', 'week', 'month', 'quarter' or 'rolling_24h'"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timezone: Mars/Olympus\n", "p.yaml:1: timezone: unknown timezone"),
        ("budgets:\n  - scope: teem:x\n    amount_usd: 1\n", "p.yaml:2: budgets.0.scope: scope must be"),
        ("budgets:\n  - scope: team:x\n", "p.yaml:2: budgets.0: amount_usd (or amount_nanos) is required"),
        ("budgets:\n  - scope: team:x\n    amount_usd: -1\n", "p.yaml:2: budgets.0: amount_usd must not be negative"),
        ("thresholds:\n  alert: 0.95\n  fallback: 0.9\n", "p.yaml:2: thresholds: thresholds must satisfy"),
        (
            "quotas:\n  - scope: user:*\n    requests_per_dya: 5\n",
            "p.yaml:3: quotas.0.requests_per_dya: unknown field 'requests_per_dya' (did you mean requests_per_day?)",
        ),
        (
            "spike_rules:\n  - {name: s, kind: daily, scope: 'team:*', action: emergency_stop}\n",
            "p.yaml:2: spike_rules.0: action emergency_stop stops non-critical features",
        ),
        ("divisions:\n  a: [x]\n  b: [x]\n", "p.yaml:1: (policy): team 'x' is in divisions 'a' and 'b'"),
        ("allowed_models:\n  envx:dev: [a]\n", "p.yaml:2: allowed_models: scope must be"),
        ("budgets: [1,\n", "p.yaml:2: YAML syntax"),
        ("- just a list\n", "p.yaml:1: (policy): the policy must be a YAML mapping"),
    ],
)
def test_errors_point_at_the_problem(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml")
    assert str(exc.value).startswith(expected), str(exc.value)


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "nope.yaml")


def test_duplicate_budget_rejected() -> None:
    with pytest.raises(PolicyError, match="duplicate budgets"):
        parse_policy("budgets:\n  - {scope: 'team:a', amount_usd: 1}\n  - {scope: 'team:a', amount_usd: 2}\n")


def test_price_override_dates_are_local_midnight() -> None:
    policy = parse_policy(
        "timezone: Europe/Berlin\npricing:\n  overrides:\n"
        "    - {provider: local, model: m, input_per_mtok: '1', output_per_mtok: '1', effective_from: 2025-01-01}\n"
    )
    row = policy.price_table.overrides[0]
    assert row.effective_from.isoformat() == "2025-01-01T00:00:00+01:00"


def test_parent_scopes_chain_project_team_division_org() -> None:
    policy = parse_policy(
        "org: acme\ndivisions:\n  growth: [marketing, sales]\nprojects:\n  launch: marketing\n", "<test>"
    )
    assert policy.parent_scopes == {
        "team:marketing": "division:growth",
        "team:sales": "division:growth",
        "division:growth": "org:acme",
        "project:launch": "team:marketing",
    }


# -- through the CLI, as an operator meets it ------------------------------------------------------------------


# Nine lists of nine aliases to the list before: 400 bytes that expand to 490 million nodes.
BILLION_LAUGHS = (
    b"a: &a ["
    + b", ".join([b"x"] * 9)
    + b"]\n"
    + b"".join(b"%c: &%c [%s]\n" % (n, n, b", ".join([b"*%c" % (n - 1)] * 9)) for n in b"bcdefghi")
)


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "policy", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", ["p.yaml:1: (policy): the file is empty"]),
        (b"# nothing but a comment\n", ["p.yaml:1: (policy): the file is empty"]),
        (
            b"budgets:\n  - scope: team:a\n    amount_usd: .nan\n  - scope: team:b\n    amount_usd: .inf\n",
            [
                "p.yaml:3: budgets.0.amount_usd: Input should be a finite number",
                "p.yaml:5: budgets.1.amount_usd: Input should be a finite number",
            ],
        ),
        (b"default_throttle_rps: .inf\n", ["p.yaml:1: default_throttle_rps: Input should be a finite number"]),
        (
            b"name: a\nbudgets:\n  - scope: team:a\n    amount_usd: 5\n    amount_usd: 50\nname: b\n",
            [
                "p.yaml:5: budgets.0.amount_usd: duplicate key (first given on line 4)",
                "p.yaml:6: name: duplicate key (first given on line 1)",
            ],
        ),
        (
            b"budgets:\n  - scope: team:a\n    amount_usd: 1e30\n",
            ["p.yaml:3: budgets.0.amount_usd: Input should be less than or equal to 1000000000"],
        ),
        (
            b"budgets:\n  - scope: team:a\n    amount_nanos: 10000000000000000000\n",
            ["p.yaml:3: budgets.0.amount_nanos: Input should be less than or equal to 1000000000000000000"],
        ),
        (b"name: caf\xe9\n", ["p.yaml:1: encoding: byte 0xe9 at column 10 is not valid UTF-8"]),
        (b"budgets: {a: 1, a: 2}\n", ["p.yaml:1: budgets.a: duplicate key (first given on line 1)"]),
        (
            BILLION_LAUGHS,
            ["p.yaml:1: YAML aliases: aliases expand the document to 490,329,064 nodes (at most 1,000,000)"],
        ),
        (b"a: &a [1, *a]\n", ["p.yaml:1: YAML aliases: an alias refers to a node that contains it"]),
        (b"budgets:\n  - {scope: team:a, amount_usd: 1:30.5}\n", ["p.yaml:2: YAML syntax: '1:30.5' is not a decimal"]),
    ],
    ids=[
        "empty",
        "comment-only",
        "nan-inf",
        "inf-rate",
        "duplicate-keys",
        "1e30",
        "nanos-overflow",
        "latin-1",
        "duplicate-on-one-line",
        "alias-bomb",
        "recursive-alias",
        "sexagesimal",
    ],
)
def test_cli_refuses_unusable_policy_files_naming_line_and_field(
    tmp_path: Path, content: bytes, expected: list[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    done = _validate(path)
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr and "ok:" not in done.stdout
    problems = [line.removeprefix(f"{tmp_path}/") for line in done.stderr.splitlines()[1:]]
    assert [p for p, e in zip(problems, expected, strict=True) if not p.startswith(e)] == [], done.stderr


def test_cli_accepts_the_largest_amount_and_an_explicit_empty_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("budgets:\n  - scope: team:a\n    amount_usd: 1_000_000_000\n")
    assert _validate(path).stdout.startswith("ok: policy default")
    path.write_text("{}\n")
    assert _validate(path).stdout.startswith("ok: policy default")


def test_cli_validates_a_policy_of_many_budgets_with_every_error_located(tmp_path: Path) -> None:
    """20,000 budgets (one of them broken at the end): one pass, and the error still names its line."""
    lines = ["budgets:"]
    for i in range(20_000):
        lines += [f"  - scope: team:t{i}", "    amount_usd: 1.5"]
    lines[-1] = "    amount_usd: .nan"
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + "\n")
    done = _validate(path)
    assert done.stderr.splitlines()[1:] == [f"{path}:40001: budgets.19999.amount_usd: Input should be a finite number"]


def test_a_fallback_model_without_a_list_price_is_a_warning_naming_the_field_and_the_model_meant() -> None:
    text = DEFAULT.read_text()
    assert load_policy(DEFAULT).fallback_price_warnings() == []
    typo = parse_policy(text.replace("gpt-4o: gpt-4o-mini", "gpt-4o: gpt-4o-mnii", 1))
    assert typo.fallback_price_warnings() == [
        "fallback_models.gpt-4o: gpt-4o-mnii has no list price (did you mean gpt-4o-mini?)"
    ]
    self_hosted = parse_policy(text.replace("gpt-4o: gpt-4o-mini", "gpt-4o: llama-3.2-3b", 1))
    assert self_hosted.fallback_price_warnings() == []  # priced by the policy's own override row


def test_a_rule_whose_scope_the_policy_cannot_place_as_written_is_a_warning() -> None:
    """A ``team:Support`` hard cap validated without a word and was never enforced: matching is exact."""
    assert load_policy(DEFAULT).scope_warnings() == []
    policy = parse_policy(
        """
org: acme
divisions: {care: [support], growth: [marketing]}
projects: {alpha: support}
budgets:
  - {scope: "team:Support", period: day, amount_usd: 1, hard_cap: true}
  - {scope: "team:markting", period: month, amount_usd: 1}
  - {scope: "team:sales", period: month, amount_usd: 1}
  - {scope: "org:acmee", period: month, amount_usd: 1}
  - {scope: "division:grwth", period: month, amount_usd: 1}
  - {scope: "user:*", period: day, amount_usd: 1}
quotas:
  - {scope: "project:Alpha", requests_per_day: 5}
allowed_models: {"division:nosuch": [gpt-4o-mini]}
"""
    )
    assert policy.scope_warnings() == [
        "budgets.0.scope: team:Support: the policy names team 'support', not 'Support' (matching is exact: calls of "
        "team:support never count here); did you mean team:support?",
        "budgets.1.scope: team:markting: the policy names team 'marketing', not 'markting' (matching is exact: calls "
        "of team:marketing never count here); did you mean team:marketing?",
        "budgets.3.scope: org:acmee: the policy's org is 'acme'; the edges refuse calls naming another org, so this "
        "rule never applies",
        "budgets.4.scope: division:grwth: divisions: lists no division 'grwth' (did you mean division:growth?)",
        "quotas.0.scope: project:Alpha: the policy names project 'alpha', not 'Alpha' (matching is exact: calls of "
        "project:alpha never count here); did you mean project:alpha?",
        "allowed_models.division:nosuch: division:nosuch: divisions: lists no division 'nosuch'",
    ]  # team:sales is outside the divisions, as a team may be: no warning


def test_policy_validate_prints_the_warning_and_still_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(DEFAULT.read_text().replace("gpt-4o: gpt-4o-mini", "gpt-4o: gpt-4o-mnii", 1))
    done = subprocess.run([sys.executable, "-m", "spendstream.cli", "policy", "validate", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("ok: policy"), done.stderr
    assert f"warning: {path}: fallback_models.gpt-4o: gpt-4o-mnii has no list price" in done.stderr


def test_a_configured_timezone_other_than_the_policys_is_a_warning_at_validate() -> None:
    policy = load_policy(DEFAULT)
    assert policy.timezone_warning(policy.timezone) is None
    warning = policy.timezone_warning("Asia/Kolkata")
    assert warning is not None and f"timezone {policy.timezone}" in warning and "Asia/Kolkata" in warning
    done = subprocess.run([sys.executable, "-m", "spendstream.cli", "policy", "validate", str(DEFAULT)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SPENDSTREAM_TIMEZONE": "Asia/Kolkata"})  # fmt: skip
    assert done.returncode == 0 and "warning: SPENDSTREAM_TIMEZONE is Asia/Kolkata" in done.stderr, done.stderr


def test_a_misspelt_field_is_named_with_the_field_it_is_most_likely_a_typo_of() -> None:
    """Not pydantic's "Extra inputs are not permitted": which field, where, and what was probably meant."""
    text = 'budgets:\n  - {scope: "team:a", period: month, amout_usd: 5}\nthreshholds: {alert: 0.5}\nzzz: 1\n'
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    problems = str(caught.value)
    assert "p.yaml:2: budgets.0.amout_usd: unknown field 'amout_usd' (did you mean amount_usd?)" in problems
    assert "p.yaml:3: threshholds: unknown field 'threshholds' (did you mean thresholds?)" in problems
    assert "p.yaml:4: zzz: unknown field 'zzz'" in problems and "Extra inputs" not in problems


def test_a_critical_feature_without_teams_is_warned_of_and_its_teams_place_calls() -> None:
    policy = parse_policy(
        "features:\n  ai_chatbot: {critical: true, teams: [support]}\n  ai_search: {critical: true}\n"
        "  ai_drafts: {critical: false}\n"
    )
    warnings = policy.scope_warnings()
    assert len(warnings) == 1 and warnings[0].startswith("features.ai_search: a critical feature without teams")
    assert policy.feature_owner_problem("support", "ai_chatbot") is None
    assert policy.feature_owner_problem("", "ai_chatbot") is not None  # a call that names no team either
    assert policy.feature_owner_problem("marketing", "ai_drafts") is None  # no teams listed: any team
    # a policy that lists no teams keeps the version it had before features could list them
    assert "teams" not in parse_policy("features:\n  ai_drafts: {critical: false}\n").to_json()


@pytest.mark.parametrize(
    ("written", "meant"),
    [("model:gpt-4o-2024-08-06", "gpt-4o"), ("model:GPT-4o", "gpt-4o"), ("model:openai/gpt-4o-mini", "gpt-4o-mini")],
)
def test_a_model_scope_is_written_as_the_name_it_holds_for(written: str, meant: str) -> None:
    """A budget on one spelling of a model holds for all of them: the policy says which name to write rather than
    read another budget than the one written."""
    with pytest.raises(PolicyError) as refused:
        parse_policy(f"budgets: [{{scope: '{written}', period: day, amount_usd: 1}}]", "p.yaml")
    assert f"write model:{meant}" in str(refused.value) and "budgets" in str(refused.value)
    assert parse_policy(f"budgets: [{{scope: 'model:{meant}', period: day, amount_usd: 1}}]").budgets


def test_a_model_scope_with_a_look_alike_character_is_refused() -> None:
    with pytest.raises(PolicyError, match="model names are printable ASCII"):
        parse_policy("budgets: [{scope: 'model:gpt\u20114o', period: day, amount_usd: 1}]", "p.yaml")
