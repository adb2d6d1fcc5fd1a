"""``spendstream dev``: the embedded runtime starts, meters a request into the ledger, stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spendstream.core.config import load_settings
from spendstream.core.ledger_store import connect
from spendstream.runtime.embedded_broker import free_port


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed within {timeout}s:\n{''.join(seen[-40:])}")


@pytest.mark.slow
def test_dev_meters_a_gateway_request_into_the_ledger_and_stops_on_sigint(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    gateway_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        "SPENDSTREAM_DATA_DIR": str(data_dir),
        "SPENDSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SPENDSTREAM_GATEWAY_PORT": str(gateway_port),
        "SPENDSTREAM_API_PORT": str(api_port),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SPENDSTREAM_GATEWAY_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        metrics = _wait_for_line(proc, "spendstream  metrics", 90, seen)
        sink_metrics = re.search(r"sink (http://\S+/metrics)", metrics)
        assert sink_metrics, metrics
        key = _wait_for_line(proc, "dev key", 90, seen).split()[3]
        _wait_for_line(proc, "ready; Ctrl-C stops everything", 30, seen)
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            data=json.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}
            ).encode(),
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "X-Spendstream-Team": "marketing",
                "X-Spendstream-Feature": "ai_content_generator",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert json.load(response)["usage"]["prompt_tokens"] == 3
        # While dev owns the embedded ledger, `spendstream report` answers through dev's API.
        deadline = time.monotonic() + 30
        while True:
            report = subprocess.run(
                [sys.executable, "-m", "spendstream.cli", "report", "top", "--by", "team", "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert report.returncode == 0, report.stderr
            rows = json.loads(report.stdout)["rows"]
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [row["key"] for row in rows] == ["marketing"]
        deadline = time.monotonic() + 10  # the row is queryable just before the sink counts it as inserted
        while True:
            with urllib.request.urlopen(sink_metrics.group(1), timeout=5) as response:
                scraped = response.read().decode()
            if "spendstream_sink_inserted_total 1.0" in scraped or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "spendstream_sink_inserted_total 1.0" in scraped
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/metrics", timeout=5) as response:
            assert 'spendstream_gateway_decisions_total{action="allow"} 1.0' in response.read().decode()
        proc.send_signal(signal.SIGINT)
        _wait_for_line(proc, "stopping: ledger drained", 60, seen)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(seen)
    settings = load_settings(data_dir=data_dir)
    client = connect(settings)
    try:
        rows = client.query(
            "SELECT team, feature, model_requested, input_tokens, cost_nanos FROM spendstream.usage_ledger FINAL"
        ).result_rows
    finally:
        client.close()
    assert len(rows) == 1
    team, feature, model, input_tokens, cost_nanos = rows[0]
    assert (team, feature, model, input_tokens) == ("marketing", "ai_content_generator", "gpt-4o-mini", 3)
    assert cost_nanos > 0


@pytest.mark.slow
def test_dev_lets_each_service_bind_its_own_metrics_port_so_another_program_cannot_take_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``SPENDSTREAM_METRICS_PORT`` unset, a port dev picked and a child bound seconds later could be taken
    meanwhile (the child then failed to start). Here every port dev could pick is already taken: the sink and
    processor bind ports of their own, dev prints where, and a restarted processor says where it listens."""
    import io
    import socket

    from spendstream.runtime import dev_stack

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    monkeypatch.setattr(dev_stack, "free_port", lambda *_: held.getsockname()[1])
    settings = load_settings(
        data_dir=tmp_path / "data", kafka_bootstrap=f"127.0.0.1:{free_port()}", api_port=free_port()
    )
    out = io.StringIO()
    try:
        with dev_stack.DevStack(settings, out=out, with_gateway=False, quiet_services=True) as stack:
            printed = re.search(r"sink (http://\S+/metrics), processor (http://\S+/metrics)", out.getvalue())
            assert printed, out.getvalue()
            for url in printed.groups():
                assert f":{held.getsockname()[1]}/" not in url
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
            processor = stack.services[1]
            assert processor.name == "processor" and processor.process is not None
            processor.process.kill()
            deadline = time.monotonic() + 90
            while "processor  running again" not in out.getvalue():
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.2)
            assert processor.metrics_url is not None
            with urllib.request.urlopen(processor.metrics_url, timeout=5) as response:
                assert response.status == 200
    finally:
        held.close()
