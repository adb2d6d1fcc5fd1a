"""Several gateway processes on one port: the supervisor of ``spendstream gateway --workers N``.

One Python process serves requests on one core. N worker processes each bind the same address with
``SO_REUSEPORT`` (the kernel spreads new connections over them) and each runs a whole gateway: its own
Enforcer (the full decision view), Emitter, upstream pool, response cache and request counters. The
supervisor serves nothing: it restarts a worker that dies, forwards SIGHUP (reload keys) and stops every
worker on SIGTERM/SIGINT, each one flushing its Emitter before it exits.

A worker that keeps exiting right after it starts means two different things. Before the gateway has ever run
(no worker lasted ``FAST_FAILURE_S``) the configuration or the port is wrong, and the gateway stops with status 1
so the operator sees it at once. Once it has run, the other workers are serving: the supervisor keeps them, says
so on stderr, and retries the failing one with a growing delay (e.g. its ``/metrics`` port taken meanwhile).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

RESTART_DELAY_S = 1.0  # between a worker's death and its replacement
FAST_FAILURE_S = 5.0  # a worker that dies sooner than this after its start failed to start
MAX_FAST_FAILURES = 3  # in a row before the gateway ever ran: it cannot start (bad config, port taken), so stop
MAX_RESTART_DELAY_S = 60.0  # the longest wait between two tries of a worker that keeps failing once the gateway ran
STOP_GRACE_S = 20.0  # a worker still running this long after its shutdown_timeout_s is killed (Emitter flush)
_PR_SET_PDEATHSIG = 1


def workers_wanted(setting: int) -> int:
    """The number of worker processes for ``--workers``/``SPENDSTREAM_GATEWAY_WORKERS``: 0 means one per CPU."""
    return setting if setting > 0 else (os.cpu_count() or 1)


def reuse_port_free(host: str, port: int) -> str | None:
    """None if the workers can bind ``host:port`` with ``SO_REUSEPORT``, else why not (e.g. another program
    listens there without it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is in use by another program"
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    finally:
        probe.close()
    return None


def restart_delay(fast_failures: int) -> float:
    """Seconds before the next try of a worker after ``fast_failures`` exits in a row right after starting:
    ``RESTART_DELAY_S`` after a worker that ran, doubling with each fast exit up to ``MAX_RESTART_DELAY_S``."""
    if fast_failures <= 1:
        return RESTART_DELAY_S
    return min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (fast_failures - 1))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no orphan keeps serving on the port."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: a worker outlives a killed supervisor
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    fast_failures: int = 0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)  # pids, oldest first


class Supervisor:
    """Start ``count`` workers with ``argv`` (a whole ``spendstream gateway`` command line), keep them running."""

    def __init__(self, argv: Sequence[str], count: int, drain_s: float = 10.0) -> None:
        self.argv = list(argv)
        self.stop_timeout_s = drain_s + STOP_GRACE_S  # a worker still running this long after SIGTERM is killed
        self.workers = [_Worker(i) for i in range(count)]
        self._stopping = False
        self._has_run = False  # some worker lasted FAST_FAILURE_S: the configuration and the port are good

    def _spawn(self, worker: _Worker) -> None:
        argv = [*self.argv, "--worker-index", str(worker.index)]
        worker.process = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        worker.started_at = time.monotonic()
        worker.restart_at = None
        worker.history.append(worker.process.pid)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (0) or until the workers cannot start (1)."""

        def stop(signum: int, frame: object) -> None:
            self._stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: self._signal_all(signal.SIGHUP))
        for worker in self.workers:
            self._spawn(worker)
        status = 0
        while not self._stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for worker in self.workers:
                if self._stopping:
                    break
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._spawn(worker)
                    continue
                assert worker.process is not None
                code = worker.process.poll()
                if code is None:
                    if now - worker.started_at >= FAST_FAILURE_S:
                        worker.fast_failures = 0
                        self._has_run = True
                    continue
                worker.fast_failures = worker.fast_failures + 1 if now - worker.started_at < FAST_FAILURE_S else 0
                if worker.fast_failures >= MAX_FAST_FAILURES and not self._has_run:
                    print(
                        f"gateway worker {worker.index} exited {MAX_FAST_FAILURES} times right after starting "
                        f"(last exit status {code}); stopping the gateway",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._stopping, status = True, 1
                    break
                delay = restart_delay(worker.fast_failures) if self._has_run else RESTART_DELAY_S
                others = sum(1 for other in self.workers if other.process is not None and other.process.poll() is None)
                also = f"; {others} other worker(s) keep serving" if worker.fast_failures >= MAX_FAST_FAILURES else ""
                print(
                    f"gateway worker {worker.index} (pid {worker.process.pid}) exited with status {code}; "
                    f"restarting it in {delay:g} s{also}",
                    file=sys.stderr,
                    flush=True,
                )
                worker.restart_at = now + delay
        self._stop_all()
        return status

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
