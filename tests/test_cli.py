"""The ``spendstream`` command: usage on typos, clear config errors, the embedded broker command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

from spendstream.core import topics
from spendstream.core.config import Settings
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port

CLI = [sys.executable, "-m", "spendstream.cli"]
REFERENCE_POLICY = Path(__file__).resolve().parents[1] / "infra" / "policy" / "default.yaml"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_typo_prints_usage_not_a_traceback() -> None:
    result = run_cli("brokr")
    assert result.returncode == 2
    assert "usage: spendstream" in result.stderr
    assert "invalid choice: 'brokr'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_flag_typo_under_a_subcommand_prints_that_subcommands_usage_and_the_flag_meant() -> None:
    cases = {
        ("policy", "apply", "--wiat", "3", "p.yaml"): ("usage: spendstream policy apply", "did you mean --wait?"),
        ("report", "weekly", "--wekks", "3"): ("usage: spendstream report", "did you mean --weeks?"),
        ("--verbos", "report", "weekly"): ("usage: spendstream [-h]", "did you mean --verbose?"),
    }
    for argv, (usage, hint) in cases.items():
        result = run_cli(*argv)
        assert result.returncode == 2, argv
        assert result.stderr.startswith(usage) and hint in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr


def test_bad_configuration_names_the_variable() -> None:
    result = run_cli("topics", "create", env={"SPENDSTREAM_USAGE_PARTITIONS": "lots"})
    assert result.returncode == 2
    assert "SPENDSTREAM_USAGE_PARTITIONS" in result.stderr
    assert "Traceback" not in result.stderr


def test_topics_create_is_idempotent(broker: EmbeddedBroker) -> None:
    env = {"SPENDSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap}
    first = run_cli("topics", "create", env=env)
    assert first.returncode == 0, first.stderr
    assert "exists   spendstream.usage" in first.stdout  # the fixture created them already
    metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=5)
    assert {topics.USAGE, topics.ENFORCEMENT, topics.ALERTS, topics.POLICY, topics.USAGE_DLQ} <= set(metadata.topics)
    assert len(metadata.topics[topics.USAGE].partitions) == 6


def test_topics_create_on_an_empty_broker_creates_every_topic() -> None:
    with EmbeddedBroker() as fresh:
        result = run_cli(
            "topics",
            "create",
            env={"SPENDSTREAM_KAFKA_BOOTSTRAP": fresh.bootstrap, "SPENDSTREAM_USAGE_PARTITIONS": "3"},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("created") == len(topics.topic_specs(3))
        metadata = AdminClient({"bootstrap.servers": fresh.bootstrap}).list_topics(timeout=5)
        assert len(metadata.topics[topics.USAGE].partitions) == 3


def test_broker_command_serves_kafka_and_stops_cleanly_on_sigint() -> None:
    port = free_port()
    proc = subprocess.Popen([*CLI, "broker", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line
        metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=5)
        assert topics.USAGE in metadata.topics
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    with EmbeddedBroker(port=port):  # the port was released: nothing was left behind
        pass


def test_output_cut_short_by_a_closed_pipe_ends_quietly_and_the_key_is_still_added(tmp_path) -> None:
    """``spendstream gateway keygen --team marketing | head -1`` keeps the key line and drops the rest."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the output (written at once, at the end) reaches the pipe
    without_unbuffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        done = subprocess.run(
            [*CLI, "gateway", "keygen", "--team", "marketing"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={**without_unbuffered, "SPENDSTREAM_DATA_DIR": str(tmp_path)},
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 128 + signal.SIGPIPE
    assert '"team": "marketing"' in (tmp_path / "keys.yaml").read_text()


def test_output_into_a_closed_pipe_stops_without_a_traceback() -> None:
    """`spendstream policy show FILE | head -1`: the reader leaves early, the command stops quietly."""
    process = subprocess.Popen(
        [*CLI, "policy", "show", str(REFERENCE_POLICY)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # before the command writes a line
    _, stderr = process.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()
    assert process.returncode == 141


def test_every_numeric_option_is_range_checked_by_argparse() -> None:
    """A bare ``type=int`` or ``type=float`` takes ``-1`` or ``nan``: every numeric option checks its range."""
    from spendstream.cli import build_parser, subcommands

    unchecked, pending = [], [build_parser()]
    while pending:
        parser = pending.pop()
        unchecked += [f"{parser.prog} {a.option_strings or a.dest}" for a in parser._actions if a.type in (int, float)]
        pending += [sub for _, sub in subcommands(parser).values()]
    assert unchecked == []


def test_a_number_out_of_range_prints_usage_naming_the_range() -> None:
    cases = {
        ("processor", "--batch-size", "-1", "--dump-totals"): (
            "usage: spendstream processor",
            "argument --batch-size: expected a whole number from 1 to 100000 (the range of "
            "SPENDSTREAM_PROCESSOR_BATCH_SIZE), got '-1'",
        ),
        ("processor", "--batch-ms", "0", "--dump-totals"): ("usage: spendstream processor", "from 1 to 10000"),
        ("processor", "--allowed-lateness-s", "-5", "--dump-totals"): ("usage: spendstream processor", "0 or more"),
        ("processor", "--batch-size", "1e3", "--dump-totals"): ("usage: spendstream processor", "got '1e3'"),
        ("policy", "apply", "--wait", "-1", str(REFERENCE_POLICY)): ("usage: spendstream policy apply", "0 to 3600"),
        ("policy", "apply", "--wait", "nan", str(REFERENCE_POLICY)): ("usage: spendstream policy apply", "got 'nan'"),
        ("gateway", "--workers", "-2"): ("usage: spendstream gateway", "from 0 to 256"),
        ("gateway", "--port", "70000"): ("usage: spendstream gateway", "from 0 to 65535"),
        ("api", "--port", "-1"): ("usage: spendstream api", "from 0 to 65535"),
        ("broker", "--port", "99999"): ("usage: spendstream broker", "from 0 to 65535"),
    }
    for argv, (usage, problem) in cases.items():
        result = run_cli(*argv, env={"SPENDSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.startswith(usage) and problem in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr


def test_commands_that_open_the_embedded_ledger_say_when_another_process_holds_it(
    ledger: object, offline_settings: Settings
) -> None:
    """The ``ledger`` fixture holds the data directory's embedded ledger, as ``spendstream dev`` or a sink does."""
    env = {"SPENDSTREAM_DATA_DIR": str(offline_settings.data_dir), "SPENDSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    for argv in (("ledger", "migrate"), ("sink",), ("sink", "--with-api"), ("api", "--port", str(free_port()))):
        result = run_cli(*argv, env=env)
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        assert f"spendstream {' '.join(w for w in argv if w.isalpha())}: the embedded ledger chdb://" in result.stderr
        assert f"is open in another process (pid {os.getpid()})" in result.stderr, (argv, result.stderr)
        assert "Stop that process first" in result.stderr
        assert "Traceback" not in result.stderr and "Cannot lock file" not in result.stderr, result.stderr
