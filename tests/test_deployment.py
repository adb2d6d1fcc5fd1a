"""docker-compose.yml and the image agree with the code: commands, settings and topic names are real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from spendstream.cli import build_parser
from spendstream.core import topics
from spendstream.core.config import Settings, settings_reference_markdown, unknown_names_problems

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SPENDSTREAM_SERVICES = {
    name: spec for name, spec in COMPOSE["services"].items() if spec.get("image", "").startswith("spendstream")
}


def _spendstream_commands(spec: dict[str, Any]) -> list[list[str]]:
    """The spendstream argv lists a compose service runs (image entrypoint is `spendstream`)."""
    entrypoint = spec.get("entrypoint")
    if entrypoint and entrypoint[:2] == ["sh", "-c"]:
        commands = []
        for part in re.split(r"&&|;", entrypoint[2]):
            words = shlex.split(part)
            assert words[0] == "spendstream", f"shell step runs something else: {part!r}"
            commands.append(words[1:])
        return commands
    return [spec["command"]]


def test_every_spendstream_service_is_in_the_compose_file() -> None:
    assert {"processor", "sink", "gateway", "api", "provision"} <= set(SPENDSTREAM_SERVICES)
    assert COMPOSE["services"]["processor"]["deploy"]["replicas"] == 2


@pytest.mark.parametrize("service", sorted(SPENDSTREAM_SERVICES))
def test_every_service_command_is_a_real_cli_command(service: str) -> None:
    parser = build_parser()
    for argv in _spendstream_commands(SPENDSTREAM_SERVICES[service]):
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown command or option
        assert callable(args.handler)


@pytest.mark.parametrize("service", sorted(SPENDSTREAM_SERVICES))
def test_every_spendstream_variable_is_a_real_setting(service: str) -> None:
    environment = SPENDSTREAM_SERVICES[service].get("environment", {})
    unknown = unknown_names_problems({name: str(value) for name, value in environment.items()})
    assert not unknown, f"{service} sets variables no code reads: {unknown}"


def test_compose_settings_parse_into_the_settings_object(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SPENDSTREAM_SERVICES["api"]["environment"].items():
        if name.startswith("SPENDSTREAM_") and name != "SPENDSTREAM_ADMIN_TOKEN":
            monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.ledger_dsn.startswith("http://")


def test_files_mounted_or_copied_by_compose_exist() -> None:
    for spec in COMPOSE["services"].values():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    policy = COMPOSE["x-spendstream"]["environment"]["SPENDSTREAM_POLICY"]
    assert (ROOT / policy.removeprefix("/app/")).is_file()


def test_topic_names_in_docs_match_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in (
        topics.USAGE, topics.ENFORCEMENT, topics.ALERTS, topics.POLICY, topics.USAGE_DLQ, topics.BUDGET_ADJUSTMENTS,
        topics.AUDIT_HEADS,
    ):  # fmt: skip
        assert f"`{name}`" in readme, f"README does not document topic {name}"
    assert {spec.name for spec in topics.topic_specs(6)} == {
        topics.USAGE,
        topics.ENFORCEMENT,
        topics.ALERTS,
        topics.POLICY,
        topics.USAGE_DLQ,
        topics.BUDGET_ADJUSTMENTS,
        topics.AUDIT_HEADS,
    }


def test_readme_configuration_reference_is_generated_from_the_settings() -> None:
    assert settings_reference_markdown() in (ROOT / "README.md").read_text(), (
        "README configuration table is stale: paste the output of "
        "`python -c 'from spendstream.core.config import settings_reference_markdown as s; print(s())'`"
    )
