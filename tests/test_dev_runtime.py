"""``spendstream dev`` as an operator meets it: taken ports, quick restarts, crashed children, Ctrl-C with
events still on the memory-only broker, and a console that says what matters."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect
from spendstream.core.topics import USAGE
from spendstream.runtime.embedded_broker import free_port
from test_sink import raw_value
from test_sink_isolation import usage_record


class Console:
    """A dev process's merged output, read by a thread so that the process never blocks on a full pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if needle in line), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._changed.wait(0.5)):
                    raise AssertionError(f"{needle!r} not printed within {timeout}s:\n{self.text[-6000:]}")
                self._changed.wait(min(remaining, 0.5))

    @property
    def text(self) -> str:
        return "".join(self.lines)


def dev_env(data_dir: Path, broker_port: int | None = None, **settings: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SPENDSTREAM_DATA_DIR": str(data_dir),
        "SPENDSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port or free_port()}",
        "SPENDSTREAM_GATEWAY_PORT": str(free_port()),
        "SPENDSTREAM_API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    env.pop("SPENDSTREAM_GATEWAY_CONFIG", None)
    env.pop("SPENDSTREAM_POLICY", None)
    return env


@contextmanager
def dev(env: dict[str, str], *args: str) -> Iterator[Console]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield Console(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def child_pid(parent: int, service: str) -> int:
    """The pid of dev's child that runs ``spendstream <service>``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == parent and service.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no {service} child of {parent}")


# -- ports -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "SPENDSTREAM_KAFKA_BOOTSTRAP",
        "SPENDSTREAM_GATEWAY_PORT",
        "SPENDSTREAM_API_PORT",
        "SPENDSTREAM_STUB_UPSTREAM_PORT",
    ],
)
def test_a_port_in_use_stops_dev_naming_the_port_and_the_setting(setting: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dev_env(tmp_path / "data")
        env[setting] = f"127.0.0.1:{port}" if setting == "SPENDSTREAM_KAFKA_BOOTSTRAP" else str(port)
        result = subprocess.run(
            [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port}" in result.stderr and setting in result.stderr, result.stderr
    assert "ready" not in result.stdout and "Traceback" not in result.stderr


def test_an_invalid_policy_file_stops_dev_at_start_naming_the_field(tmp_path: Path) -> None:
    """Also with a data directory that holds an applied policy: the services are started with the file too."""
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: x\ntimezone: UTC\nbudgets:\n  - {scope: "team:a", period: day, amout_usd: 5}\n')
    result = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream", "--policy", str(bad)],
        env=dev_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{bad}:4: budgets.0.amout_usd" in result.stderr and "not started" in result.stderr, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_a_second_dev_on_the_same_data_directory_is_refused_before_it_writes_anything(tmp_path: Path) -> None:
    from spendstream.runtime.data_dir_lock import hold_data_dir

    data = tmp_path / "data"
    with hold_data_dir(data):  # as a running `spendstream dev` holds it
        result = subprocess.run(
            [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream"],
            env=dev_env(data),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"(pid {os.getpid()}) runs on the data directory {data}" in result.stderr, result.stderr
    assert sorted(p.name for p in data.iterdir()) == ["stack.lock"]  # no tokens, keys or ledger written


def time_wait_on(port: int) -> None:
    """Leave a connection on ``port`` in TIME_WAIT, as a stopped broker does: its side closed first."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        server_side, _ = listener.accept()
        server_side.close()  # the active close: this end, bound to `port`, enters TIME_WAIT
        client.recv(1)
        client.close()


def test_a_broker_port_in_time_wait_after_a_quick_restart_is_reused(tmp_path: Path) -> None:
    port = free_port()
    time_wait_on(port)
    with socket.socket() as plain, pytest.raises(OSError):  # the probe of old would have called it taken
        plain.bind(("127.0.0.1", port))
    with dev(dev_env(tmp_path / "data", broker_port=port)) as console:
        console.wait_for("ready; Ctrl-C stops everything")
        assert f"broker     127.0.0.1:{port} " in console.text
        assert "is taken" not in console.text
        console.proc.send_signal(signal.SIGINT)
        assert console.proc.wait(90) == 0


# -- supervision and the console ----------------------------------------------------------------------


def free_port_pair() -> int:
    """A port whose next port is free too."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def test_dev_restarts_a_killed_processor_says_so_and_keeps_the_console_quiet(tmp_path: Path) -> None:
    metrics = free_port_pair()
    env = dev_env(tmp_path / "data", SPENDSTREAM_METRICS_PORT=str(metrics))
    with dev(env) as console:
        console.wait_for("ready; Ctrl-C stops everything")
        # SPENDSTREAM_METRICS_PORT: the sink's /metrics on it, the processor's on the next port
        console.wait_for(f"sink http://127.0.0.1:{metrics}/metrics, processor http://127.0.0.1:{metrics + 1}/metrics")
        ready_at = time.monotonic()
        processor = child_pid(console.proc.pid, "processor")
        os.kill(processor, signal.SIGKILL)
        console.wait_for(f"processor  exited with code -{signal.SIGKILL}; restarting in", 30)
        console.wait_for("processor  running again (restart 1)", 90)
        assert child_pid(console.proc.pid, "processor") != processor
        time.sleep(max(0.0, 12 - (time.monotonic() - ready_at)))  # past the sink's 10 s progress interval, idle
        idle = list(console.lines)
        assert not [line for line in idle if "[INFO]" in line or " INFO " in line], console.text
        assert not [line for line in idle if "sink progress" in line], console.text

        # Traffic: $7,500 of marketing's $8,000 monthly budget crosses the alert and fallback thresholds.
        producer = Producer({"bootstrap.servers": env["SPENDSTREAM_KAFKA_BOOTSTRAP"]})
        producer.produce(USAGE, raw_value(usage_record(team="marketing", cost_nanos=7_500 * 10**9)), key=b"acme/m")
        assert producer.flush(10) == 0
        console.wait_for("alert      team:marketing", 60)
        console.wait_for("decision   team:marketing fallback", 60)
        console.wait_for("sink progress", 30)
        console.proc.send_signal(signal.SIGINT)
        assert console.proc.wait(90) == 0
    assert len(console.lines) < 30, console.text


def test_a_dead_broker_stops_the_stack_saying_why_and_leaves_no_service_running(tmp_path: Path) -> None:
    """The broker held every topic in memory: restarting the services against a new, empty one would be a new
    stack. So dev stops, says why, and stops its services (it used to flood the console, then leave them running
    after a Ctrl-C that failed with a traceback)."""
    with dev(dev_env(tmp_path / "data")) as console:
        console.wait_for("ready; Ctrl-C stops everything")
        services = {name: child_pid(console.proc.pid, name) for name in ("processor", "sink", "gateway")}
        os.kill(child_pid(console.proc.pid, "--listener-url"), signal.SIGKILL)
        console.wait_for(f"broker     exited with code -{signal.SIGKILL}; its topics were in memory, so the stack")
        assert console.proc.wait(120) == 1, console.text
    assert "stopping: the broker is gone" in console.text and "Traceback" not in console.text, console.text
    assert console.text.rstrip().endswith("stopped"), console.text
    for name, pid in services.items():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], name


# -- Ctrl-C with events the sink has not written -------------------------------------------------------


def test_events_left_on_the_broker_at_ctrl_c_are_saved_and_replayed_exactly_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    records = [
        usage_record(cost_nanos=7_000 + i, occurred_at=datetime.now(UTC) - timedelta(minutes=1)) for i in range(20)
    ]
    env = dev_env(data_dir, SPENDSTREAM_DEV_STOP_TIMEOUT_S="3")
    with dev(env) as console:
        console.wait_for("ready; Ctrl-C stops everything")
        os.kill(child_pid(console.proc.pid, "sink"), signal.SIGSTOP)  # a sink that cannot keep up
        producer = Producer({"bootstrap.servers": env["SPENDSTREAM_KAFKA_BOOTSTRAP"]})
        for record in records:
            producer.produce(USAGE, raw_value(record), key=b"acme/search", headers=[("origin", b"test")])
        assert producer.flush(10) == 0
        console.proc.send_signal(signal.SIGINT)
        assert console.proc.wait(90) == 0
    saved = console.wait_for("usage events not in the ledger saved to")
    assert "20 usage events" in saved, console.text
    assert len(list(data_dir.glob("usage-spill-*.jsonl"))) == 1

    with dev(dev_env(data_dir)) as console:
        console.wait_for("replayed   20 usage events")
        console.wait_for("ready; Ctrl-C stops everything")
        console.proc.send_signal(signal.SIGINT)
        console.wait_for("stopping: ledger drained")
        assert console.proc.wait(90) == 0
    assert not list(data_dir.glob("usage-spill-*.jsonl"))

    settings = load_settings(data_dir=data_dir)
    client = connect(settings)
    try:
        rows = client.query(
            "SELECT event_id, cost_nanos, count() FROM spendstream.usage_ledger GROUP BY ALL"
        ).result_rows
    finally:
        client.close()
    assert sorted((str(event_id), cost, copies) for event_id, cost, copies in rows) == sorted(
        (str(r["event_id"]), r["cost_nanos"], 1) for r in records
    )


# -- a team shut off ------------------------------------------------------------------------------------------

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
SALES = {"X-Spendstream-Team": "sales"}


def tiny_sales_budget(tmp_path: Path) -> Path:
    """A policy whose team:sales budget its first call spends."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: sales\ntimezone: UTC\norg: acme\ndivisions: {sales_org: [sales]}\nbudgets:\n"
        '  - {scope: "team:sales", period: day, amount_usd: 0.000001}\n'
    )
    return policy


def gateway_of(console: Console, env: dict[str, str]) -> tuple[str, str]:
    """The chat URL and the dev key of a dev stack, once it is ready."""
    console.wait_for("ready; Ctrl-C stops everything", 120)
    key = console.wait_for("dev key").split()[3]
    return f"http://127.0.0.1:{env['SPENDSTREAM_GATEWAY_PORT']}/v1/chat/completions", key


def shut_off_sales(url: str, key: str) -> None:
    """Spend team:sales's budget, then wait for the processor's shutoff to reach the gateway."""
    from test_edge_policy import post

    assert post(url, CHAT, SALES, key)[0] == 200  # past its $0.000001 at once
    deadline = time.monotonic() + 60
    while (status := post(url, CHAT, SALES, key)[0]) != 402:
        assert status == 200 and time.monotonic() < deadline, status
        time.sleep(0.2)


def test_a_team_shut_off_before_a_restart_is_refused_from_the_first_call_after_it(tmp_path: Path) -> None:
    """The embedded broker restarts empty: edges served a shut-off team (and a feature held at $0 for approval) for
    the seconds until the processor had rebuilt its windows. The ledger now gives the decisions in force back to
    the empty broker before the gateway starts."""
    from test_edge_policy import post

    policy = tiny_sales_budget(tmp_path)
    mail_port = free_port()  # a user session: after a restart without --policy, dev caught mail on the default
    # policy's port while the restored policy sent it to its own, and every alert became a dead letter
    smtp = f"notifications: {{smtp: {{host: 127.0.0.1, port: {mail_port}, sender: s@acme.example}}}}\n"
    policy.write_text(policy.read_text() + smtp)
    env = dev_env(tmp_path / "data")
    with dev(env, "--policy", str(policy)) as console:
        shut_off_sales(*gateway_of(console, env))
    env = dev_env(tmp_path / "data")  # the same data directory, a fresh (empty) broker
    with dev(env) as console:
        url, key = gateway_of(console, env)
        status, _, body = post(url, CHAT, SALES, key)
        assert status == 402, body
        assert f"mail       127.0.0.1:{mail_port} catches the policy's e-mail" in console.text
    assert "restored 1 decisions in force from the ledger" in (tmp_path / "data" / "sink.log").read_text()


def test_a_client_that_may_write_to_the_broker_cannot_lift_a_shutoff(tmp_path: Path) -> None:
    """The attack found by a review: a shut-off team's service, with the broker credentials every edge has,
    publishes an ``allow`` for its team with a version far ahead of the processor's (and a tombstone), a policy
    without budgets and an "approved" overage of $1,000. ``dev`` signs decisions, policies and budget steps with
    its data directory's key pair and every service verifies them: the team stays refused (the gateway served it
    on the old code)."""
    from confluent_kafka import Producer

    from spendstream.core.budget_lifecycle import BudgetRequest, Kind, Status
    from spendstream.core.codec import AvroCodec
    from spendstream.core.events import Decision, PolicyRecord
    from spendstream.core.policy import parse_policy
    from spendstream.core.topics import BUDGET_ADJUSTMENTS, ENFORCEMENT, POLICY
    from test_edge_policy import post

    env = dev_env(tmp_path / "data")
    with dev(env, "--policy", str(tiny_sales_budget(tmp_path))) as console:
        url, key = gateway_of(console, env)
        assert "signs decisions and policies (new key pair)" in console.text
        shut_off_sales(url, key)

        forger = Producer({"bootstrap.servers": env["SPENDSTREAM_KAFKA_BOOTSTRAP"]})
        allow = Decision(scope="team:sales", action="allow", version=10**18)
        forger.produce(ENFORCEMENT, AvroCodec("decision").encode(allow.to_avro()), key=b"team:sales")
        forger.produce(ENFORCEMENT, None, key=b"team:sales")
        unlimited = parse_policy("name: sales\ntimezone: UTC\norg: acme\n")
        record = PolicyRecord(name="sales", version=unlimited.version, document=unlimited.to_json())
        forger.produce(POLICY, AvroCodec("policy").encode(record.to_avro()), key=b"sales")
        now = datetime.now(UTC)
        approved = BudgetRequest(
            id="forged-1", kind=Kind.overage, scope="team:sales", period="day", amount_nanos=10**12,
            starts_at=now, expires_at=None, status=Status.approved, requested_by="sales", requested_at=now,
            reason="", step="approved", step_by="cfo", step_at=now, step_reason="", approver_level="cfo",
        )  # fmt: skip
        forger.produce(BUDGET_ADJUSTMENTS, approved.to_json(), key=b"forged-1")  # a $1,000 overage, "approved"
        assert forger.flush(10) == 0
        time.sleep(3)  # edges read the enforcement topic within 0.1 s and the policy within 0.2 s
        statuses = [post(url, CHAT, SALES, key)[0] for _ in range(5)]
        assert statuses == [402] * 5, statuses


# -- timezone ----------------------------------------------------------------------------------------


def test_reports_and_the_timezone_warning_follow_the_policy_in_force_across_restarts(tmp_path: Path) -> None:
    """User sessions: with a Berlin policy applied, `report chargeback` said ``timezone: UTC`` (reports cut by
    SPENDSTREAM_TIMEZONE, unset); and after a restart that restored it, dev compared SPENDSTREAM_TIMEZONE with the
    un-applied startup file ("policy default has timezone UTC") instead of the policy in force."""
    import json

    berlin = tmp_path / "berlin.yaml"
    berlin.write_text("name: berlin\ntimezone: Europe/Berlin\n")

    def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spendstream.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    def report_timezone(env: dict[str, str]) -> str:
        done = cli(env, "report", "chargeback", "--format", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["params"]["timezone"]

    env = dev_env(tmp_path / "data")
    env.pop("SPENDSTREAM_TIMEZONE", None)
    with dev(env) as console:
        console.wait_for("ready; Ctrl-C stops everything", 120)
        assert report_timezone(env) == "UTC"  # the bundled policy's
        assert cli(env, "policy", "apply", "--wait", "30", str(berlin)).returncode in (0, 3)
        deadline = time.monotonic() + 30
        while (timezone := report_timezone(env)) != "Europe/Berlin":
            assert time.monotonic() < deadline, timezone
            time.sleep(0.5)
    assert "SPENDSTREAM_TIMEZONE is" not in console.text  # unset: nothing chosen to warn of

    # Restarted with SPENDSTREAM_TIMEZONE set, and the bundled (UTC) policy as the startup file: Berlin is restored.
    env = dev_env(tmp_path / "data", SPENDSTREAM_TIMEZONE="UTC")
    with dev(env) as console:
        console.wait_for("ready; Ctrl-C stops everything", 120)
        assert "policy     berlin version" in console.wait_for("restored (the last applied)")
        warning = console.wait_for("SPENDSTREAM_TIMEZONE is UTC", 5)  # printed before ready
        assert "policy berlin has timezone Europe/Berlin" in warning and "by Europe/Berlin" in warning, warning
        assert report_timezone(env) == "Europe/Berlin"
    env = dev_env(tmp_path / "data", SPENDSTREAM_TIMEZONE="Europe/Berlin")
    with dev(env) as console:
        console.wait_for("ready; Ctrl-C stops everything", 120)
        assert "SPENDSTREAM_TIMEZONE is" not in console.text, console.text
