"""Fixtures that start real components: a Tansu broker on a free loopback port, a chDB ledger."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spendstream.core.config import Settings, load_settings
from spendstream.runtime.embedded_broker import EmbeddedBroker
from spendstream.runtime.topic_admin import create_topics

# Tests never read the settings of the shell they run from: a developer's `spendstream dev` data directory
# (`.spendstream` in the checkout) holds a ledger and a verify key that would make every Enforcer ignore the
# tests' unsigned decisions. Each worker starts from no SPENDSTREAM_* variable but the broker binary, and an
# empty data directory of its own; a test that needs one names its own.
for _name in [name for name in os.environ if name.upper().startswith("SPENDSTREAM_")]:
    if _name.upper() != "SPENDSTREAM_BROKER_BIN":
        del os.environ[_name]
os.environ["SPENDSTREAM_DATA_DIR"] = tempfile.mkdtemp(prefix="spendstream-tests-")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A fresh broker per test (it starts in well under a second) with every topic created."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as running:
        create_topics({"bootstrap.servers": running.bootstrap}, usage_partitions=6)
        yield running


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedBroker) -> Settings:
    """Settings pointing at the test broker and a per-test data directory (chDB ledger, spool)."""
    return load_settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path / "data")


@pytest.fixture
def offline_settings(tmp_path: Path) -> Settings:
    """Settings for tests that need no broker (ledger-only, pure logic)."""
    return load_settings(data_dir=tmp_path / "data")


@pytest.fixture
def ledger(offline_settings: Settings) -> Iterator[Any]:
    """A migrated chDB ledger owned by the test process.

    chDB allows one directory per process at a time, so this closes the client afterwards;
    a test that runs the sink in a subprocess must not hold this fixture while it runs.
    """
    from spendstream.core.ledger_store import connect, migrate

    client = connect(offline_settings)
    migrate(client, offline_settings)
    yield client
    client.close()
