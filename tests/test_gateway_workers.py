"""``spendstream gateway --workers N``: several gateway processes on one port, each enforcing, supervised."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spendstream.core.config import Settings
from spendstream.core.events import Decision
from spendstream.gateway.keys import hash_key
from spendstream.gateway.workers import FAST_FAILURE_S, restart_delay
from spendstream.runtime.embedded_broker import free_port
from stub_upstream import StubUpstream, publish_decisions, wait_for

CLI = [sys.executable, "-m", "spendstream.cli"]
CAPPED, OPEN = "sk-ss-capped-team", "sk-ss-open-team"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def call(port: int, method: str, path: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    """One request on a new connection (the kernel picks the worker per connection)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection.request(method, path, json.dumps(CHAT) if method == "POST" else None, headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def health(port: int) -> dict[str, Any] | None:
    try:
        return call(port, "GET", "/healthz")[1]
    except OSError:
        return None


def pids_answering(port: int, tries: int = 200) -> dict[int, dict[str, Any]]:
    """The /healthz of every worker that answered one of ``tries`` fresh connections, by pid."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        body = health(port)
        if body is not None:
            seen[body["pid"]] = body
    return seen


@pytest.fixture
def stub() -> Iterator[StubUpstream]:
    with StubUpstream() as running:
        yield running


def gateway_config(tmp_path: Path, stub: StubUpstream) -> Path:
    config = tmp_path / "gateway.json"
    keys = [
        {"sha256": hash_key(CAPPED), "team": "capped", "name": "capped"},
        {"sha256": hash_key(OPEN), "team": "open", "name": "open"},
    ]
    providers = {
        "openai": {"upstreams": [{"base_url": stub.url}]},
        "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": stub.url}]},
    }
    config.write_text(json.dumps({"keys": keys, "providers": providers}))
    return config


def env_of(settings: Settings) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")},
        "SPENDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SPENDSTREAM_DATA_DIR": str(settings.data_dir),
    }


def two_free_ports() -> int:
    """A port p with p + 1 free too (each worker's own /metrics), below the kernel's ephemeral range.

    A replaced worker binds its port again after the dead one released it; a port from the ephemeral range can
    meanwhile become the source port of any outgoing connection on the machine (the parallel tests make many),
    and the replacement would find it taken."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        base = rng.randrange(20_000, low - 1)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", base))
                second.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base


def shutoffs_counted(port: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    prefix = 'spendstream_gateway_decisions_total{action="shutoff"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_two_workers_serve_the_port_each_enforcing_and_are_supervised(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    publish_decisions(settings.kafka_bootstrap, [Decision(scope="team:capped", action="shutoff", version=1)])
    port, metrics = free_port(), two_free_ports()
    proc = subprocess.Popen(
        [*CLI, "gateway", "--workers", "2", "--config", str(gateway_config(tmp_path, stub)), "--port", str(port)],
        env={**env_of(settings), "SPENDSTREAM_METRICS_PORT": str(metrics)},
    )
    try:
        # Both workers answer on the one port, each once its own Enforcer has read the decisions.
        assert wait_for(
            lambda: len([b for b in pids_answering(port, 20).values() if b["enforcer_ready"]]) == 2, 60, interval=0.2
        ), "two ready workers did not answer on the port"
        for _ in range(40):
            assert call(port, "POST", "/v1/chat/completions", CAPPED)[0] == 402
            assert call(port, "POST", "/v1/chat/completions", OPEN)[0] == 200
        workers = pids_answering(port)
        assert len(workers) == 2 and proc.pid not in workers
        for pid, body in workers.items():  # every worker refused the capped team and served the other
            assert body["requests"].get("shutoff", 0) > 0, f"worker {pid} enforced nothing: {body['requests']}"
            assert body["requests"].get("ok", 0) > 0, f"worker {pid} served nothing: {body['requests']}"

        # Each worker's own /metrics (SPENDSTREAM_METRICS_PORT + its index) counts the refusals it applied.
        assert wait_for(lambda: shutoffs_counted(metrics) > 0 and shutoffs_counted(metrics + 1) > 0, 10)

        # A worker that dies is replaced; the replacement enforces too.
        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        assert wait_for(
            lambda: {p for p, b in pids_answering(port, 20).items() if b["enforcer_ready"]} - set(workers), 60
        ), "the dead worker was not replaced"
        assert all(call(port, "POST", "/v1/chat/completions", CAPPED)[0] == 402 for _ in range(20))

        # SIGTERM stops the supervisor and every worker.
        survivors = set(pids_answering(port)) | set(workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in survivors:
            assert wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10), f"{pid} still runs"
        assert health(port) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def listening_pid(port: int, pids: set[int]) -> int:
    """Which of ``pids`` listens on 127.0.0.1:``port`` (from /proc: the socket's inode among their open files)."""
    wanted = f"0100007F:{port:04X}"
    inodes = {
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split())[1] == wanted and fields[3] == "0A"  # 0A: LISTEN
    }
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return pid
    raise LookupError(f"none of {pids} listens on {port}")


def test_a_worker_that_cannot_start_again_leaves_the_others_serving_and_is_retried(
    settings: Settings, stub: StubUpstream, tmp_path: Path
) -> None:
    """Once the gateway has run, a worker whose restarts fail (here: its /metrics port taken meanwhile) is retried
    with a growing delay while the other worker keeps serving; it comes back once the port is free."""
    port, metrics = free_port(), two_free_ports()
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [*CLI, "gateway", "--workers", "2", "--config", str(gateway_config(tmp_path, stub)), "--port", str(port)],
            env={**env_of(settings), "SPENDSTREAM_METRICS_PORT": str(metrics)},
            stderr=stderr,
        )
    started = time.monotonic()
    try:
        assert wait_for(
            lambda: len([b for b in pids_answering(port, 20).values() if b["enforcer_ready"]]) == 2, 60, interval=0.2
        ), "two ready workers did not answer on the port"
        first = set(pids_answering(port))
        time.sleep(max(0.0, started + FAST_FAILURE_S + 1 - time.monotonic()))  # the gateway has run
        victim = listening_pid(metrics + 1, first)
        os.kill(victim, signal.SIGKILL)
        with socket.socket() as squatter:
            deadline = time.monotonic() + 1  # the replacement starts RESTART_DELAY_S after the death
            while True:
                try:
                    squatter.bind(("127.0.0.1", metrics + 1))
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the dead worker's metrics port was not released"
                    time.sleep(0.01)
            squatter.listen()
            assert wait_for(lambda: "other worker(s) keep serving" in log.read_text(), 60), log.read_text()
            # one line saying which port and what to set, not a traceback per try (an attacker session)
            said = log.read_text()
            assert f"cannot serve /metrics on port {metrics + 1}" in said and "Traceback" not in said, said
            assert proc.poll() is None, log.read_text()
            assert call(port, "POST", "/v1/chat/completions", OPEN)[0] == 200  # the survivor serves
        # the port is free again: a later try brings the worker back
        assert wait_for(lambda: {p for p, b in pids_answering(port, 20).items() if b["enforcer_ready"]} - first, 90), (
            log.read_text()
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_restart_delays_grow_only_for_a_worker_that_keeps_failing() -> None:
    assert [restart_delay(n) for n in range(10)] == [1, 1, 2, 4, 8, 16, 32, 60, 60, 60]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_on_a_port_another_program_holds_say_so(settings: Settings, stub: StubUpstream, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*CLI, "gateway", "--workers", "2", "--config", str(gateway_config(tmp_path, stub)), "--port", str(port)],
            env=env_of(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "Traceback" not in result.stderr
