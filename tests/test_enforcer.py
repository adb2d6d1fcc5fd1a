"""The Enforcer against a real broker: catch-up, live updates, versions, scopes, staleness, fail-open/closed."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from spendstream.core.events import Decision
from spendstream.edge.enforcer import Enforcer
from spendstream.runtime.embedded_broker import EmbeddedBroker
from stub_upstream import heartbeating, publish_decisions, publish_heartbeat, wait_for


def test_loads_existing_decisions_then_follows_new_ones(broker: EmbeddedBroker) -> None:
    publish_decisions(
        broker.bootstrap,
        [
            Decision(scope="team:marketing", action="shutoff", version=1, reason="monthly budget spent"),
            Decision(scope="team:sales", action="fallback", version=1, fallback_models={"gpt-4o": "gpt-4o-mini"}),
        ],
    )
    publish_heartbeat(broker.bootstrap)  # a processor is alive
    with Enforcer(broker.bootstrap) as enforcer:
        assert enforcer.wait_ready(10)
        assert enforcer.staleness_s < 5
        verdict = enforcer.check(team="marketing", model="gpt-4o")
        assert (verdict.action, verdict.scope, verdict.reason) == ("shutoff", "team:marketing", "monthly budget spent")
        assert enforcer.check(team="sales", model="gpt-4o")[:2] == ("fallback", "gpt-4o-mini")
        assert enforcer.check(team="support", model="gpt-4o")[:2] == ("allow", "gpt-4o")

        publish_decisions(broker.bootstrap, [Decision(scope="team:marketing", action="allow", version=2)])
        published = time.monotonic()
        assert wait_for(lambda: enforcer.check(team="marketing", model="gpt-4o").action == "allow", 1.0)
        assert time.monotonic() - published < 1.0

        # An older version arriving late changes nothing; a tombstone removes the scope.
        publish_decisions(broker.bootstrap, [Decision(scope="team:marketing", action="shutoff", version=1)])
        publish_decisions(broker.bootstrap, [("team:sales", None)])
        assert wait_for(lambda: enforcer.check(team="sales", model="gpt-4o").action == "allow", 2.0)
        assert enforcer.check(team="marketing", model="gpt-4o").action == "allow"
        assert enforcer.stats["stale_versions"] >= 1


def test_every_scope_of_a_request_counts(broker: EmbeddedBroker) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    publish_decisions(
        broker.bootstrap,
        [
            Decision(scope="user:*", action="throttle", throttle_rps=0.0, version=1, reason="50 calls/day"),
            Decision(scope="org:acme", action="alert", version=1, reason="80% of budget"),
            Decision(scope="feature:ai_chatbot", action="shutoff", version=1, expires_at=past),
            Decision(scope="environment:dev", action="allow", version=1, allowed_models=["llama-3.2-1b"]),
            Decision(scope="not a scope", action="shutoff", version=1),
        ],
    )
    enforcer = Enforcer(broker.bootstrap, hierarchy={"team:web": "division:eng", "division:eng": "org:acme"})
    with enforcer:
        assert enforcer.wait_ready(10)
        assert enforcer.check(user="u1", model="m").action == "throttle"
        assert enforcer.check(user="u1", model="m").retry_after_s > 0
        # The team's ancestors are looked up from the hierarchy; the expired shutoff no longer applies.
        verdict = enforcer.check(team="web", feature="ai_chatbot", model="gpt-4o")
        assert (verdict.action, verdict.scope) == ("alert", "org:acme")
        assert enforcer.check(environment="dev", model="gpt-4o").action == "deny_model"
        assert enforcer.check(environment="dev", model="llama-3.2-1b").action == "allow"
        assert enforcer.stats["bad_records"] == 1


def test_fail_open_by_default_and_closed_on_request(tmp_path) -> None:
    nobody = EmbeddedBroker()  # a free port with no broker behind it
    with Enforcer(nobody.bootstrap) as open_, Enforcer(nobody.bootstrap, fail_closed=True) as closed:
        assert not open_.wait_ready(0.5)
        assert open_.staleness_s == float("inf")
        assert open_.check(team="t", model="m").action == "allow"
        verdict = closed.check(team="t", model="m")
        assert verdict.action == "unavailable" and verdict.blocked and verdict.http_status == 503


def test_staleness_grows_while_the_broker_is_down(tmp_path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    from spendstream.runtime.topic_admin import create_topics

    create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=1)
    publish_decisions(broker.bootstrap, [Decision(scope="team:t", action="shutoff", version=1)])
    with heartbeating(broker.bootstrap), Enforcer(broker.bootstrap, fail_closed=True, max_staleness_s=1.0) as enforcer:
        assert enforcer.wait_ready(10)
        assert wait_for(lambda: enforcer.staleness_s < 1.0, 10)  # the processor's heartbeats arrive
        assert enforcer.check(team="t", model="m").action == "shutoff"
        broker.kill()
        assert wait_for(lambda: enforcer.staleness_s > 1.0, 10)
        assert enforcer.check(team="u", model="m").action == "unavailable"


def test_a_view_that_turns_stale_and_fresh_again_is_said_once_each_in_the_log(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A fail-open edge serving on decisions no processor confirms any more says so, not only in a metric."""
    logged = caplog.at_level("WARNING", logger="spendstream.edge.enforcer")
    with logged, Enforcer(broker.bootstrap, max_staleness_s=1.0) as enforcer:
        assert enforcer.wait_ready(10)
        with heartbeating(broker.bootstrap, interval_s=0.2):
            assert wait_for(lambda: enforcer.staleness_s < 1.0, 10)
            time.sleep(1.5)  # fresh past the quiet start: nothing to say
        assert wait_for(lambda: any("stale" in r.getMessage() for r in caplog.records), 10)
        with heartbeating(broker.bootstrap, interval_s=0.2):
            assert wait_for(lambda: any("fresh again" in r.getMessage() for r in caplog.records), 10)
            time.sleep(1.0)
    said = [r.getMessage() for r in caplog.records if "enforcement view" in r.getMessage()]
    # each change is said once: stale and fresh alternate (a loaded machine may delay a heartbeat past the limit)
    assert "enforcement view stale" in said[0] and "requests are served (fail-open)" in said[0], said
    assert "fresh again" in said[1], said
    assert all(("fresh again" in a) != ("fresh again" in b) for a, b in pairwise(said)), said


def test_a_decision_on_a_model_holds_for_every_name_of_it(broker: EmbeddedBroker) -> None:
    """An attacker session passed a spent ``model:gpt-4o`` cap by asking for ``gpt-4o-2024-08-06``, ``GPT-4O`` or
    ``openai/gpt-4o``; the shutoff holds for each, and the model served stays the name the client asked for."""
    publish_decisions(
        broker.bootstrap, [Decision(scope="model:gpt-4o", action="shutoff", version=1, reason="model budget spent")]
    )
    publish_heartbeat(broker.bootstrap)
    with Enforcer(broker.bootstrap) as enforcer:
        assert enforcer.wait_ready(10)
        for name in ("gpt-4o", "gpt-4o-2024-08-06", "GPT-4O", " gpt-4o", "openai/gpt-4o", "gpt-4o-latest"):
            verdict = enforcer.check(team="web", model=name)
            assert (verdict.action, verdict.scope, verdict.model) == ("shutoff", "model:gpt-4o", name)
        for name in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "local/gpt-4o"):
            assert enforcer.check(team="web", model=name).action == "allow"
