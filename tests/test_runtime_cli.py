"""CLI commands that need the broker say once, plainly, that it is unreachable and exit non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spendstream.runtime.embedded_broker import free_port

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "infra" / "policy" / "default.yaml"


@pytest.mark.parametrize(
    "argv", [["policy", "show"], ["policy", "apply", str(POLICY)], ["topics", "create"]], ids=" ".join
)
def test_a_command_that_needs_the_broker_names_the_address_and_the_setting_when_none_answers(
    argv: list[str], tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": bootstrap, "SPENDSTREAM_DATA_DIR": str(tmp_path)}
    env.pop("SPENDSTREAM_POLICY", None)
    result = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *argv], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip().splitlines()
    assert len(output) == 1, "\n".join(output)
    assert bootstrap in output[0] and "SPENDSTREAM_KAFKA_BOOTSTRAP" in output[0]


def test_dev_refuses_to_start_a_notifier_whose_channel_secret_is_unset(tmp_path: Path) -> None:
    """`spendstream dev` runs the notifier: like `spendstream notifier` it names the field and the variable, rather
    than start a notifier whose webhook fails every delivery."""
    hook = '    finance-hook: {kind: webhook, url: "https://finance.example/hook", secret_env: FINANCE_HOOK_SECRET}\n'
    text = POLICY.read_text().replace("  people:\n", hook + "  people:\n", 1)
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    env["SPENDSTREAM_DATA_DIR"] = str(tmp_path)
    env.pop("FINANCE_HOOK_SECRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "dev", "--policy", str(policy)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "notifications.channels.finance-hook.secret_env: environment variable FINANCE_HOOK_SECRET is not set" in (
        result.stderr
    )
    assert "broker" not in result.stdout  # refused before anything started
