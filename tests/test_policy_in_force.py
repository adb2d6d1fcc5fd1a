"""The policy in force, as a user meets it: ``spendstream policy apply``, a ``spendstream processor`` started without
``SPENDSTREAM_POLICY``, usage through the ``Emitter`` and verdicts from the ``Enforcer`` (real broker, real workers).

One processor serves the module; the tests run in file order and the last one kills it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spendstream import Emitter, Enforcer, UsageEvent
from spendstream.core.policy import parse_policy
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics
from stub_upstream import wait_for

ROOT = Path(__file__).resolve().parents[1]
USD = 1_000_000_000

ACME = """
name: acme-prod
timezone: UTC
org: acme
divisions:
  growth: [marketing, sales]
budgets:
  - {scope: "team:marketing", period: day, amount_usd: 1}
  - {scope: "team:sales", period: day, amount_usd: 1, hard_cap: true}
  - {scope: "customer:bigco", period: day, amount_usd: 1}
features:
  ai_chatbot: {critical: true, throttle_rps: 0.5}
"""


@dataclass
class Deployment:
    bootstrap: str
    env: dict[str, str]
    first_apply: subprocess.CompletedProcess[str]
    processor: subprocess.Popen[bytes]
    emitter: Emitter
    enforcer: Enforcer
    policy_dir: Path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, timeout=timeout)

    def spend(self, usd: float, **attribution: str) -> None:
        self.emitter.emit(
            UsageEvent(
                provider="openai",
                model_requested="gpt-4o",
                input_tokens=10,
                output_tokens=5,
                cost_nanos=int(usd * USD),
                **attribution,
            )
        )
        assert self.emitter.flush(15) == 0


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("policy-in-force")
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        create_topics({"bootstrap.servers": broker.bootstrap}, usage_partitions=2)
        env = {
            **os.environ,
            "SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SPENDSTREAM_DATA_DIR": str(root / "data"),
            "SPENDSTREAM_USAGE_PARTITIONS": "2",
        }
        env.pop("SPENDSTREAM_POLICY", None)
        env.pop("SPENDSTREAM_METRICS_PORT", None)
        policy_file = root / "acme.yaml"
        policy_file.write_text(ACME)
        # applied before any processor runs: nothing can confirm it yet
        first_apply = run_cli(env, "policy", "apply", "--wait", "2", str(policy_file))
        log = open(root / "processor.log", "ab")  # noqa: SIM115
        processor = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "processor"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        emitter = Emitter(broker.bootstrap, spool_dir=root / "spool")
        enforcer = Enforcer(broker.bootstrap, hierarchy=parse_policy(ACME).parent_scopes).start()
        try:
            yield Deployment(broker.bootstrap, env, first_apply, processor, emitter, enforcer, root)
        finally:
            enforcer.stop()
            emitter.close(5)
            if processor.poll() is None:
                processor.kill()
                processor.wait()
            log.close()


def test_apply_with_no_processor_running_says_that_none_confirmed(deployment: Deployment) -> None:
    applied = deployment.first_apply
    assert applied.returncode == 3, applied.stderr
    assert f"published policy acme-prod version {parse_policy(ACME).version}" in applied.stdout
    assert "no processor confirmed" in applied.stderr


def test_a_policy_named_anything_is_in_force_for_a_processor_started_without_one(deployment: Deployment) -> None:
    version = parse_policy(ACME).version
    enforcer = deployment.enforcer
    assert wait_for(lambda: enforcer.processor_policy_version == version, 90, interval=0.2), "no heartbeat"
    deployment.spend(1.5, org="acme", team="marketing", feature="campaigns")
    assert wait_for(lambda: enforcer.check(team="marketing", model="gpt-4o").action == "shutoff", 45, interval=0.1)
    decision = enforcer.decisions()["team:marketing"]
    assert "team:marketing: $1.50 spent, 150.0% of $1.00" in decision.reason
    shown = deployment.cli("policy", "show")
    assert shown.returncode == 0, shown.stderr
    assert f"policy acme-prod version {version}" in shown.stdout
    assert f"version {version}" in shown.stdout.split("processor ", 1)[1]  # the worker reports the same version


def test_apply_waits_for_the_processor_to_confirm_the_new_version(deployment: Deployment) -> None:
    raised = ACME.replace("name: acme-prod", "name: acme-prod-v2").replace(
        '{scope: "team:marketing", period: day, amount_usd: 1}',
        '{scope: "team:marketing", period: day, amount_usd: 100}',
    )
    path = deployment.policy_dir / "raised.yaml"
    path.write_text(raised)
    applied = deployment.cli("policy", "apply", str(path))
    version = parse_policy(raised).version
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert f"confirmed version {version}" in applied.stdout
    enforcer = deployment.enforcer
    assert wait_for(lambda: enforcer.check(team="marketing", model="gpt-4o").action == "allow", 30, interval=0.1)
    assert enforcer.processor_policy_version == version
    # put the $1 budget back in force for the next tests
    back = deployment.cli("policy", "apply", str(deployment.policy_dir / "acme.yaml"))
    assert back.returncode == 0, back.stdout + back.stderr


def _actions(enforcer: Enforcer, calls: int, **request: str) -> set[str]:
    return {enforcer.check(model="gpt-4o", **request).action for _ in range(calls)}


def test_a_critical_feature_is_throttled_not_shut_off_by_any_exhausted_scope(deployment: Deployment) -> None:
    enforcer = deployment.enforcer
    # marketing is past its day (105 % is enough), whether or not the tests before it ran in this process (the
    # suite's workers share out a module's tests): its decision is a shutoff
    if enforcer.check(team="marketing", model="gpt-4o").action != "shutoff":
        deployment.spend(1.05, org="acme", team="marketing", feature="campaigns")
    assert wait_for(lambda: enforcer.check(team="marketing", model="gpt-4o").action == "shutoff", 30, interval=0.1)
    assert _actions(enforcer, 5, team="marketing", feature="campaigns") == {"shutoff"}
    chatbot = _actions(enforcer, 5, team="marketing", feature="ai_chatbot")
    assert "throttle" in chatbot and "shutoff" not in chatbot  # 0.5 requests/s: the first call passes
    # the same for a customer's budget, and through the hierarchy (a request naming only its team and feature)
    deployment.spend(1.05, org="acme", team="support", customer="bigco", feature="search")
    assert wait_for(lambda: enforcer.check(customer="bigco", model="gpt-4o").action == "shutoff", 30, interval=0.1)
    assert "shutoff" not in _actions(enforcer, 3, customer="bigco", team="support", feature="ai_chatbot")
    # a hard cap stops everything, critical features included
    deployment.spend(1.05, org="acme", team="sales", feature="ai_chatbot")
    assert wait_for(lambda: enforcer.check(team="sales", model="gpt-4o").action == "shutoff", 30, interval=0.1)
    assert _actions(enforcer, 3, team="sales", feature="ai_chatbot") == {"shutoff"}


def test_staleness_is_the_time_since_the_processor_proved_it_is_alive(deployment: Deployment) -> None:
    enforcer = deployment.enforcer
    if enforcer.check(team="marketing", model="gpt-4o").action != "shutoff":  # run without the tests before it
        deployment.spend(1.05, org="acme", team="marketing", feature="campaigns")
    assert wait_for(lambda: enforcer.check(team="marketing", model="gpt-4o").action == "shutoff", 30, interval=0.1)
    with Enforcer(deployment.bootstrap, fail_closed=True, max_staleness_s=3.0) as closed:
        assert closed.wait_ready(15)
        assert wait_for(lambda: closed.staleness_s < 3.0, 15, interval=0.1)
        assert closed.check(team="marketing", feature="campaigns", model="gpt-4o").action == "shutoff"
        assert enforcer.staleness_s < 3.0
        deployment.processor.kill()
        deployment.processor.wait()
        # the broker is up and the view complete, but no processor is alive any more
        assert wait_for(lambda: closed.staleness_s > 3.0, 15, interval=0.1)
        assert enforcer.staleness_s > 3.0
        verdict = closed.check(team="other", model="gpt-4o")
        assert verdict.action == "unavailable" and verdict.http_status == 503
        assert enforcer.check(team="other", model="gpt-4o").action == "allow"  # fail-open keeps answering
