"""``spendstream dev``: the whole pipeline on one machine, no Docker.

The broker runs in this process's care; every service is a child process of the same
``spendstream`` command, configured only through ``SPENDSTREAM_*`` variables, exactly as in
production. The embedded chDB ledger is owned by one process, so the sink also serves the API and runs the notifier.

Shutdown order is what keeps "nothing lost" true with a memory-only broker: stop the gateway
(its Emitter flushes), wait until the sink has committed everything on the usage topic, then
stop processor and sink; whatever the sink did not commit is saved to the data directory
(:mod:`spendstream.runtime.usage_spill`) before the broker stops, and replayed at the next start.

While running, dev supervises its children: a service that exits is restarted with backoff,
and the console says so. The console is quiet by default: one line per service when it is
ready or changes state, decisions and alerts as they happen, the sink's progress while there
is traffic, and every warning or error a service prints; ``verbose`` relays everything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from spendstream.core.config import Settings
from spendstream.core.policy import Policy, PolicyError, load_policy, policy_from_json
from spendstream.core.record_signature import SIGNING_KEY_FILE, VERIFY_KEY_FILE, write_key_pair
from spendstream.core.topics import ALERTS, ENFORCEMENT
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.mail_catcher import LOOPBACK, MailCatcher
from spendstream.runtime.policy_memory import PolicyRecorder, republish_last_policy
from spendstream.runtime.topic_admin import create_topics
from spendstream.runtime.usage_spill import SpilledRecord, replay_spill, spill_files, unconsumed_usage, write_spill

SERVICE_COLOURS = {"processor": 35, "sink": 36, "gateway": 33}
# A child's line the quiet console shows: a warning or an error, a traceback, the sink's progress under traffic.
_NOTEWORTHY = re.compile(
    r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|Traceback|^\w+(\.\w+)*(Error|Exception|Exit)\b|sink progress:"
)
_METRICS_SERVED = re.compile(r"^metrics on (http://\S+/metrics)$")  # what serve_metrics prints
# Lines that continue the record above them (faust's tables, traceback frames): shown when that record is.
_CONTINUATION = re.compile(r"^(\s|\||\+|〃)")
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 60.0  # a service up this long has its restart backoff reset


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment
    # Where its /metrics listens, as the service printed it ("metrics on URL"); None until it did. With
    # ``healthy_by_metrics`` that URL is its health check (the processor serves nothing else).
    metrics_url: str | None = None
    healthy_by_metrics: bool = False
    process: subprocess.Popen[str] | None = field(default=None, repr=False)
    restarts: int = 0  # restarts since the service last ran STABLE_AFTER_S
    started_at: float = 0.0
    restart_at: float | None = None  # set while a crashed service waits for its restart
    down: bool = False  # exited and not yet healthy again


class PortTaken(RuntimeError):
    """A port dev needs is in use by another program; the message names it and the setting that moves it."""


def restart_delay(restarts: int) -> float:
    """Seconds before restarting a service that has already been restarted ``restarts`` times in a row."""
    return min(2.0**restarts, MAX_RESTART_DELAY_S)


def _bootstrap_port(bootstrap: str) -> int | None:
    """The port to give the embedded broker: the configured one when it is a loopback address."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return int(port) if host in ("127.0.0.1", "localhost") else None


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True unless a socket is bound to the port; one in TIME_WAIT after a quick restart counts as free.

    ``SO_REUSEADDR`` is what the broker and the services bind with too, so this answers what they will meet.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _dev_api_tokens(settings: Settings) -> dict[str, str]:
    """An ingest and a viewer token for this run, replacing the previous run's (so those stop working)."""
    from spendstream.api.tokens import add_token

    path = settings.api_tokens_path
    return {role: add_token(path, role, f"dev-{role}", replace=True) for role in ("ingest", "viewer")}


class DevStack:
    """Broker + topics + policy + processor, sink (with API) and gateway as supervised child processes.

    ``with_gateway=False`` leaves the gateway out (the demo runs its own, in process); ``env`` is added to
    every child's environment (e.g. a processor setting the story needs); ``verbose`` relays every line the
    services print, ``quiet_services`` none (and no decisions or alerts).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        policy: Path | None = None,
        gateway_config: Path | None = None,
        dev_key: str | None = None,
        out: IO[str] = sys.stdout,
        quiet_services: bool = False,
        verbose: bool = False,
        with_gateway: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.gateway_config = gateway_config
        self.dev_key = dev_key
        self.out = out
        self.quiet_services = quiet_services
        self.verbose = verbose
        self.with_gateway = with_gateway
        self.extra_env = dict(env or {})
        self.broker: EmbeddedBroker | None = None
        self.recorder: PolicyRecorder | None = None
        self.mail: MailCatcher | None = None
        self.failed = threading.Event()  # the stack cannot go on (its broker died): the caller stops it
        self.services: list[Service] = []
        self.data_dir = settings.data_dir.resolve()
        self._print_lock = threading.Lock()
        self._services_lock = threading.Lock()  # spawning and stopping a child never interleave
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.api_tokens: dict[str, str] = {}  # role -> token made for this run (dev-ingest, dev-viewer)

    @cached_property
    def policy_in_file(self) -> Policy | None:
        """The ``--policy`` file's policy, parsed once (None: no file, or not a valid policy)."""
        try:
            return load_policy(self.policy) if self.policy is not None else None
        except PolicyError:
            return None

    def _say_if_policy_file_differs(self, restored_version: str) -> None:
        """A restart restores the last applied policy, not the startup file: say so when they differ, so an edited
        ``--policy`` file is not believed to be in force."""
        if self.policy is None:
            return
        in_file = self.policy_in_file
        version = f"version {in_file.version}" if in_file is not None else "not a valid policy"
        if version != f"version {restored_version}":
            self.say(
                f"policy     {self.policy} ({version}) not applied: the last applied policy stays in force; "
                f"`spendstream policy apply {self.policy}` puts the file in force"
            )

    def _ensure_signing_keys(self) -> None:
        """Every service of the stack signs and verifies decisions and policies with one key pair: the data
        directory's, made at first start (kept across restarts) unless the settings name their own."""
        if self.settings.signing_key is not None or self.settings.verify_key is not None:
            return
        if not (self.data_dir / SIGNING_KEY_FILE).is_file() or not (self.data_dir / VERIFY_KEY_FILE).is_file():
            write_key_pair(self.data_dir)
            self.say(f"keys       {self.data_dir / SIGNING_KEY_FILE} signs decisions and policies (new key pair)")

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_signing_keys()
        wanted = _bootstrap_port(self.settings.kafka_bootstrap)
        self._check_ports(wanted)
        self.broker = EmbeddedBroker(port=wanted or free_port(), log_path=self.data_dir / "broker.log").start()
        self.env = self._service_env()
        create_topics({"bootstrap.servers": self.broker.bootstrap}, self.settings.usage_partitions)
        self.say(f"broker     {self.broker.bootstrap} (Kafka protocol, memory-only), topics created")
        self._replay_spills()
        restored = republish_last_policy(
            {"bootstrap.servers": self.broker.bootstrap}, self.data_dir, self.settings.record_signer()
        )
        if restored is not None:
            self.say(f"policy     {restored.name} version {restored.version} restored (the last applied)")
            self._say_if_policy_file_differs(restored.version)
        elif self.policy is not None:
            self._run_cli("policy", "apply", "--wait", "0", str(self.policy))  # the processor starts below
            self.say(f"policy     {self.policy} applied")
        bootstrap = {"bootstrap.servers": self.broker.bootstrap}
        self.recorder = PolicyRecorder(
            bootstrap,
            self.data_dir,
            self.settings.record_verifier(),
            lambda record: self.say(f"policy     {record.name} version {record.version} in force (applied)"),
        )
        self.recorder.start()
        # the policy in force: after a restart the restored one, not the startup file's
        in_force = policy_from_json(restored.document) if restored is not None else self.policy_in_file
        self._say_if_timezones_differ(in_force)
        self._start_mail_catcher(in_force)
        api = f"http://{self.settings.api_host}:{self.settings.api_port}"
        self.api_tokens = _dev_api_tokens(self.settings)
        gateway = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"
        metrics_host = self.settings.metrics_host
        base = self.settings.metrics_port  # set: the sink serves on it, the processor on the next port
        # Unset: each binds a port of the system's choosing (0) and prints it, so no port picked here can be taken
        # by another program before the service binds it.
        sink_metrics, processor_metrics = (base, base + 1) if base else (0, 0)
        self.services = [
            Service(
                "sink",
                ["sink", "--with-api", "--with-notifier"],
                f"{api}/healthz",
                {"SPENDSTREAM_METRICS_PORT": str(sink_metrics)},
            ),
            Service(
                "processor",
                ["processor"],
                env={"SPENDSTREAM_METRICS_PORT": str(processor_metrics)},
                healthy_by_metrics=True,
            ),
        ]
        if self.with_gateway:
            config = ["--config", str(self.gateway_config)] if self.gateway_config else []
            # Its workers (with --workers) serve /metrics from the port after the processor's on.
            env = {"SPENDSTREAM_METRICS_PORT": str(base + 2)} if base else {}
            self.services.append(Service("gateway", ["gateway", *config], f"{gateway}/healthz", env))
        for service in self.services:
            self._spawn(service)
        self._wait_healthy(timeout=60)
        self._start_thread(self._supervise, "supervisor")
        if not self.quiet_services:
            self._start_thread(self._announce_decisions, "decisions")
        self.say(f"ledger     {self.settings.ledger_dsn} (database {self.settings.clickhouse_database})")
        self.say("processor  running (spend windows; decisions on spendstream.enforcement)")
        self.say(f"api        {api}/  (dashboard; POST /v1/usage; GET /v1/reports/weekly)")
        self.say("notifier   alerts and reports to the policy's owners (`spendstream notifications list`)")
        self.say(f"dashboard  {api}/?token={self.api_tokens['viewer']}")
        self.say(f"api tokens ingest {self.api_tokens['ingest']}  viewer {self.api_tokens['viewer']}  (Bearer ...)")
        if self.with_gateway:
            self.say(f"gateway    {gateway}/v1  (OpenAI- and Anthropic-compatible)")
        gateway_metrics = f"gateway {gateway}/metrics, " if self.with_gateway else ""
        workers = self.settings.gateway_workers or (os.cpu_count() or 1)  # 0: one per CPU, as the gateway reads it
        if self.with_gateway and base and workers > 1:
            each = ", ".join(f"http://{metrics_host}:{base + 2 + i}/metrics" for i in range(workers))
            gateway_metrics = f"gateway {gateway}/metrics (any worker; each: {each}), "
        sink, processor = self.services[0].metrics_url, self.services[1].metrics_url
        self.say(f"metrics    {gateway_metrics}api {api}/metrics, sink {sink}, processor {processor}")
        if self.dev_key:
            self.say(f"dev key    {self.dev_key}  (Authorization: Bearer ...; X-Spendstream-Team etc. allowed)")

    def stop(self) -> None:
        """Gateway first, then drain the usage topic into the ledger, then the rest; spill what is left; broker last."""
        self._stopping.set()
        if self.broker is None:
            return  # nothing started (e.g. a port was taken)
        for thread in self._threads:
            thread.join(timeout=5)
        timeout = self.settings.dev_stop_timeout_s
        if self.with_gateway:
            self.say("stopping: gateway")
            self._stop_service("gateway", timeout)
        broker_alive = self.broker.exit_code is None
        if not broker_alive:
            self.say("stopping: the broker is gone; usage events it held and the ledger had not written are lost")
        elif self._alive("sink"):
            try:
                lag = self.wait_sink_caught_up(timeout=timeout)
                self.say("stopping: ledger drained" if lag == 0 else f"stopping: {lag} events not yet in the ledger")
            except KafkaException as exc:
                self.say(f"stopping: WARNING the sink's lag could not be read ({exc}); stopping anyway")
        self.say("stopping: processor, sink")
        self._stop_service("processor", timeout)
        self._stop_service("sink", timeout)
        if self.recorder is not None:
            self.recorder.stopping.set()
            self.recorder.join(timeout=5)
            self.recorder = None
        if self.mail is not None:
            self.mail.stop()
            self.mail = None
        if self.broker is not None:
            if broker_alive:
                try:
                    self._spill_unconsumed()
                except KafkaException as exc:
                    self.say(f"stopping: WARNING the usage topic could not be read ({exc}); later events may be lost")
            self.broker.stop()
            self.broker = None
        self.say("stopped")

    def __enter__(self) -> DevStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        with self._print_lock:
            print(f"spendstream  {line}", file=self.out, flush=True)

    def _say_if_timezones_differ(self, in_force: Policy | None) -> None:
        """Compared with the policy in force: warned of the startup file's, a restart under a restored policy
        contradicted itself ("budgets are enforced by UTC days" with Berlin in force and set)."""
        warning = in_force.timezone_warning(self.settings.timezone_set) if in_force is not None else None
        if warning is not None:
            self.say(f"policy     WARNING {warning}")

    def _start_mail_catcher(self, policy: Policy | None) -> None:
        """Catch the policy's e-mail when it goes to a loopback port nothing listens on (``runtime.mail_catcher``)."""
        notifications = policy.notifications if policy is not None else None
        smtp = notifications.smtp if notifications is not None else None
        if smtp is None or smtp.host not in LOOPBACK:
            return
        if not _port_free(smtp.port, smtp.host):
            self.say(f"mail       {smtp.host}:{smtp.port} in use: the policy's e-mail goes to what listens there")
            return
        self.mail = MailCatcher(smtp.host, smtp.port, self.data_dir / "mail").start()
        self.say(f"mail       {smtp.host}:{smtp.port} catches the policy's e-mail, saved in {self.mail.directory}")

    def _check_ports(self, broker_port: int | None) -> None:
        """Stop before starting anything when a configured port is in use (a port in TIME_WAIT is reused)."""
        wanted = [(self.settings.api_host, self.settings.api_port, "SPENDSTREAM_API_PORT")]
        if broker_port:
            wanted.insert(0, ("127.0.0.1", broker_port, "SPENDSTREAM_KAFKA_BOOTSTRAP"))
        if self.with_gateway:
            wanted.append((self.settings.gateway_host, self.settings.gateway_port, "SPENDSTREAM_GATEWAY_PORT"))
        for host, port, setting in wanted:
            if port and not _port_free(port, host):
                raise PortTaken(
                    f"port {port} on {host} is in use by another program; stop it or choose another port with {setting}"
                )

    def _service_env(self) -> dict[str, str]:
        assert self.broker is not None
        env = {**os.environ, "SPENDSTREAM_KAFKA_BOOTSTRAP": self.broker.bootstrap}
        env["SPENDSTREAM_DATA_DIR"] = str(self.data_dir)
        env["SPENDSTREAM_CLICKHOUSE_DSN"] = self.settings.ledger_dsn
        env["SPENDSTREAM_API_PORT"] = str(self.settings.api_port)
        env["SPENDSTREAM_GATEWAY_PORT"] = str(self.settings.gateway_port)
        env.pop("SPENDSTREAM_METRICS_PORT", None)  # one port per service, given below
        if self.policy is not None:
            env["SPENDSTREAM_POLICY"] = str(self.policy)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        return env

    def _run_cli(self, *args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "spendstream.cli", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"spendstream {' '.join(args)} failed:\n{result.stderr.strip()}")

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, daemon=True, name=name)
        thread.start()
        self._threads.append(thread)

    def _spawn(self, service: Service) -> None:
        was_at, service.metrics_url = service.metrics_url, None  # restarted, it may listen elsewhere: it says
        service.process = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", *service.argv],
            env={**self.env, **service.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C reaches dev only; dev stops the children in order
        )
        service.started_at = time.monotonic()
        threading.Thread(
            target=self._relay, args=(service, service.process, was_at), daemon=True, name=f"relay-{service.name}"
        ).start()

    def _relay(self, service: Service, process: subprocess.Popen[str], metrics_was: str | None) -> None:
        """Copy a child's output to its log file, and to the console what the console should show; note where its
        /metrics listens (``metrics_was``: where it listened before this start)."""
        assert process.stdout is not None
        log = (self.data_dir / f"{service.name}.log").open("a", encoding="utf-8")
        colour = SERVICE_COLOURS.get(service.name, 37)
        tty = hasattr(self.out, "isatty") and self.out.isatty()
        prefix = f"\033[{colour}m{service.name:>10}\033[0m | " if tty else f"{service.name:>10} | "
        shown = False  # whether the record the next continuation line belongs to was shown
        with log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if (served := _METRICS_SERVED.match(line)) and process is service.process:
                    service.metrics_url = served[1]
                    if metrics_was is not None and served[1] != metrics_was:
                        self.say(f"{service.name:<10} /metrics now on {served[1]}")
                if self.quiet_services:
                    continue
                if not _CONTINUATION.match(line):
                    shown = self.verbose or bool(_NOTEWORTHY.search(line))
                if shown:
                    with self._print_lock:
                        self.out.write(prefix + line)
                        self.out.flush()

    def _supervise(self) -> None:
        """Restart a child that exited, with backoff, and say so; say when it is healthy again. A dead broker is
        not restarted: it held every topic in memory, so the stack stops (``failed``) and says why."""
        while not self._stopping.wait(0.25):
            code = self.broker.exit_code if self.broker is not None else None
            if code is not None:
                self.say(
                    f"broker     exited with code {code}; its topics were in memory, so the stack stops: start "
                    f"`spendstream dev` again (log: {self.data_dir / 'broker.log'})"
                )
                self.failed.set()
                return
            for service in self.services:
                with self._services_lock:
                    if self._stopping.is_set():
                        return
                    self._supervise_one(service)

    def _supervise_one(self, service: Service) -> None:
        assert service.process is not None
        now = time.monotonic()
        if service.process.poll() is None:
            if service.down and self._healthy(service):
                service.down = False
                self.say(f"{service.name:<10} running again (restart {service.restarts})")
            elif not service.down and now - service.started_at >= STABLE_AFTER_S:
                service.restarts = 0
            return
        if service.restart_at is None:
            delay = restart_delay(service.restarts)
            service.down, service.restart_at = True, now + delay
            self.say(
                f"{service.name:<10} exited with code {service.process.returncode}; restarting in {delay:.0f}s "
                f"(log: {self.data_dir / (service.name + '.log')})"
            )
        elif now >= service.restart_at:
            service.restart_at = None
            service.restarts += 1
            self._spawn(service)

    def _healthy(self, service: Service) -> bool:
        url = service.metrics_url if service.healthy_by_metrics else service.health_url
        if url is None:
            return not service.healthy_by_metrics  # (not before it said where its /metrics listens)
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def _announce_decisions(self) -> None:
        """Print each decision and alert the processor publishes, as it happens."""
        from spendstream.core.codec import AvroCodec
        from spendstream.core.events import Alert, Decision
        from spendstream.core.record_signature import vouched_for

        assert self.broker is not None
        decision_codec, alert_codec = AvroCodec("decision"), AvroCodec("alert")
        verifier = self.settings.record_verifier()  # what no service applies is not news either
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": "spendstream-dev-console"})
        consumer.assign([TopicPartition(ENFORCEMENT, 0, OFFSET_BEGINNING), TopicPartition(ALERTS, 0, OFFSET_BEGINNING)])
        announced: dict[str, str] = {}  # scope -> the action last printed
        try:
            while not self._stopping.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error() is not None or message.value() is None:
                    continue
                if not vouched_for(verifier, message.topic(), message):
                    continue
                try:
                    if message.topic() == ENFORCEMENT:
                        decision = Decision.from_avro(decision_codec.decode(message.value()))
                        if announced.get(decision.scope, "allow") == decision.action:
                            continue  # the same action with a fresher spend, or a hard cap's standing while allowed
                        announced[decision.scope] = decision.action
                        reason = f": {decision.reason}" if decision.reason else ""
                        self.say(f"decision   {decision.scope} {decision.action}{reason}")
                    else:
                        alert = Alert.from_avro(alert_codec.decode(message.value()))
                        self.say(f"alert      {alert.scope} {alert.kind} ({alert.severity}): {alert.message}")
                except (ValueError, KeyError):  # a record of another kind (e.g. a heartbeat) is not news
                    continue
        finally:
            consumer.close()

    def _alive(self, name: str) -> bool:
        service = next((s for s in self.services if s.name == name), None)
        return bool(service and service.process and service.process.poll() is None)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [s for s in self.services if s.health_url or s.healthy_by_metrics]
        while pending:
            for service in list(pending):
                assert service.process is not None
                if service.process.poll() is not None:
                    raise RuntimeError(
                        f"{service.name} exited with code {service.process.returncode} during start; "
                        f"see {self.data_dir / (service.name + '.log')}"
                    )
                if self._healthy(service):
                    pending.remove(service)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy within {timeout:.0f}s: {', '.join(s.name for s in pending)}")
            time.sleep(0.2)

    def _stop_service(self, name: str, timeout: float) -> None:
        with self._services_lock:
            for service in self.services:
                if service.name == name and service.process and service.process.poll() is None:
                    service.process.send_signal(signal.SIGINT)
                    try:
                        service.process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self.say(f"{name} did not stop within {timeout:.0f}s; killing it")
                        service.process.kill()
                        service.process.wait()

    def sink_lag(self) -> int:
        """Usage events on the broker past the sink's committed offsets (at least 1 if not all could be read)."""
        assert self.broker is not None
        unread, complete = unconsumed_usage(self._sink_group_reader(), timeout=5)
        return len(unread) if complete else max(len(unread), 1)

    def _sink_group_reader(self) -> Consumer:
        """A consumer in the sink's group that reads without joining it or committing (see unconsumed_usage)."""
        assert self.broker is not None
        return Consumer(
            {
                "bootstrap.servers": self.broker.bootstrap,
                "group.id": self.settings.sink_group,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )

    def wait_sink_caught_up(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        lag = self.sink_lag()
        while lag > 0 and time.monotonic() < deadline:
            time.sleep(0.25)
            lag = self.sink_lag()
        return lag

    def _spill_unconsumed(self) -> None:
        """Save the usage events the sink did not commit to a file that the next start replays."""
        assert self.broker is not None
        unread, complete = unconsumed_usage(self._sink_group_reader(), timeout=30)
        if unread:
            path = write_spill(self.data_dir, [SpilledRecord.of(message) for message in unread])
            self.say(
                f"stopping: {len(unread)} usage events not in the ledger saved to {path}; "
                "the next `spendstream dev` with this data directory replays them"
            )
        if not complete:
            self.say("stopping: WARNING the usage topic could not be read to its end; later events may be lost")

    def _replay_spills(self) -> None:
        """Produce the events a previous run saved at shutdown, before any service starts."""
        assert self.broker is not None
        paths = spill_files(self.data_dir)
        if not paths:
            return
        producer = Producer(
            {"bootstrap.servers": self.broker.bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 20}
        )
        for path in paths:
            count = replay_spill(path, producer, self.settings.usage_partitions)
            self.say(f"replayed   {count} usage events saved at the last shutdown ({path.name})")


def write_dev_gateway_config(data_dir: Path, upstream_url: str | None) -> tuple[Path, str]:
    """A gateway config with one fresh dev key (header attribution allowed), reading the data directory's keys
    file too, where ``spendstream gateway keygen`` adds keys (the gateway reloads it); returns (path, key)."""
    from spendstream.gateway.keys import data_dir_keys_file, hash_key, new_key

    key = new_key()
    keys_file = data_dir_keys_file(data_dir)
    config: dict[str, object] = {
        "keys": [{"sha256": hash_key(key), "name": "dev", "org": "acme", "allow_header_attribution": True}],
        "keys_file": str(keys_file),
    }
    if upstream_url:
        config["providers"] = {
            "openai": {"kind": "openai", "upstreams": [{"base_url": upstream_url}]},
            "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": upstream_url}]},
        }
    path = data_dir / "gateway.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    if not keys_file.exists():
        keys_file.write_text("# virtual keys added by `spendstream gateway keygen`\n")
    path.write_text(json.dumps(config, indent=2))
    return path, key


def default_policy_path() -> Path:
    """``infra/policy/default.yaml`` of a checkout, or its copy packaged into an installed wheel."""
    checkout = Path(__file__).resolve().parents[3] / "infra" / "policy" / "default.yaml"
    if checkout.is_file():
        return checkout
    from importlib import resources

    return Path(str(resources.files("spendstream") / "_policy" / "default.yaml"))
