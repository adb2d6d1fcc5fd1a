"""``spendstream dev``: the whole pipeline on one machine, no Docker.

The broker runs in this process's care; every service is a child process of the same
``spendstream`` command, configured only through ``SPENDSTREAM_*`` variables, exactly as in
production. The embedded chDB ledger is owned by one process, so the sink also serves the API.

Shutdown order is what keeps "nothing lost" true with a memory-only broker: stop the gateway
(its Emitter flushes), wait until the sink has committed everything on the usage topic, then
stop processor and sink, and only then the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from spendstream.core.config import Settings
from spendstream.core.topics import USAGE
from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from spendstream.runtime.policy_memory import PolicyRecorder, republish_last_policy
from spendstream.runtime.topic_admin import create_topics

SERVICE_COLOURS = {"processor": 35, "sink": 36, "gateway": 33}


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment
    process: subprocess.Popen[str] | None = field(default=None, repr=False)


def _bootstrap_port(bootstrap: str) -> int | None:
    """The port to give the embedded broker: the configured one when it is a loopback address."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return int(port) if host in ("127.0.0.1", "localhost") else None


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class DevStack:
    """Broker + topics + policy + processor, sink (with API) and gateway as child processes.

    ``with_gateway=False`` leaves the gateway out (the demo runs its own, in process); ``env`` is added to
    every child's environment (e.g. a processor setting the story needs).
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
        with_gateway: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.gateway_config = gateway_config
        self.dev_key = dev_key
        self.out = out
        self.quiet_services = quiet_services
        self.with_gateway = with_gateway
        self.extra_env = dict(env or {})
        self.broker: EmbeddedBroker | None = None
        self.recorder: PolicyRecorder | None = None
        self.services: list[Service] = []
        self.data_dir = settings.data_dir.resolve()
        self._print_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        wanted = _bootstrap_port(self.settings.kafka_bootstrap)
        port = wanted if wanted and _port_free(wanted) else free_port()
        if wanted and port != wanted:
            self.say(f"port {wanted} is taken; the broker uses {port} instead")
        self.broker = EmbeddedBroker(port=port, log_path=self.data_dir / "broker.log").start()
        self.env = self._service_env()
        create_topics({"bootstrap.servers": self.broker.bootstrap}, self.settings.usage_partitions)
        self.say(f"broker     {self.broker.bootstrap} (Kafka protocol, memory-only), topics created")
        restored = republish_last_policy({"bootstrap.servers": self.broker.bootstrap}, self.data_dir)
        if restored is not None:
            self.say(f"policy     {restored.name} version {restored.version} restored (the last applied)")
        elif self.policy is not None:
            self._run_cli("policy", "apply", str(self.policy))
            self.say(f"policy     {self.policy} applied")
        self.recorder = PolicyRecorder({"bootstrap.servers": self.broker.bootstrap}, self.data_dir)
        self.recorder.start()
        api = f"http://{self.settings.api_host}:{self.settings.api_port}"
        gateway = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"
        metrics_host = self.settings.metrics_host
        sink_metrics, processor_metrics = free_port(), free_port()
        self.services = [
            Service("sink", ["sink", "--with-api"], f"{api}/healthz", {"SPENDSTREAM_METRICS_PORT": str(sink_metrics)}),
            Service("processor", ["processor"], env={"SPENDSTREAM_METRICS_PORT": str(processor_metrics)}),
        ]
        if self.with_gateway:
            config = ["--config", str(self.gateway_config)] if self.gateway_config else []
            self.services.append(Service("gateway", ["gateway", *config], f"{gateway}/healthz"))
        for service in self.services:
            self._spawn(service)
        self._wait_healthy(timeout=60)
        self.say(f"ledger     {self.settings.ledger_dsn} (database {self.settings.clickhouse_database})")
        self.say(f"api        {api}/  (dashboard; POST /v1/usage; GET /v1/reports/weekly)")
        if self.with_gateway:
            self.say(f"gateway    {gateway}/v1  (OpenAI- and Anthropic-compatible)")
        gateway_metrics = f"gateway {gateway}/metrics, " if self.with_gateway else ""
        self.say(
            f"metrics    {gateway_metrics}api {api}/metrics, sink http://{metrics_host}:{sink_metrics}/metrics"
            f", processor http://{metrics_host}:{processor_metrics}/metrics"
        )
        if self.dev_key:
            self.say(f"dev key    {self.dev_key}  (Authorization: Bearer ...; X-Spendstream-Team etc. allowed)")

    def stop(self) -> None:
        """Gateway first, then drain the usage topic into the ledger, then the rest, broker last."""
        if self.with_gateway:
            self.say("stopping: gateway")
            self._stop_service("gateway")
        if self.broker is not None and self._alive("sink"):
            lag = self.wait_sink_caught_up(timeout=60)
            self.say("stopping: ledger drained" if lag == 0 else f"stopping: {lag} events not yet in the ledger")
        self.say("stopping: processor, sink")
        self._stop_service("processor")
        self._stop_service("sink")
        if self.recorder is not None:
            self.recorder.stopping.set()
            self.recorder.join(timeout=5)
            self.recorder = None
        if self.broker is not None:
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

    def _spawn(self, service: Service) -> None:
        service.process = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", *service.argv],
            env={**self.env, **service.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C reaches dev only; dev stops the children in order
        )
        threading.Thread(target=self._relay, args=(service,), daemon=True, name=f"relay-{service.name}").start()

    def _relay(self, service: Service) -> None:
        assert service.process is not None and service.process.stdout is not None
        log = (self.data_dir / f"{service.name}.log").open("a", encoding="utf-8")
        colour = SERVICE_COLOURS.get(service.name, 37)
        tty = hasattr(self.out, "isatty") and self.out.isatty()
        prefix = f"\033[{colour}m{service.name:>10}\033[0m | " if tty else f"{service.name:>10} | "
        with log:
            for line in service.process.stdout:
                log.write(line)
                log.flush()
                if not self.quiet_services:
                    with self._print_lock:
                        self.out.write(prefix + line)
                        self.out.flush()

    def _alive(self, name: str) -> bool:
        service = next((s for s in self.services if s.name == name), None)
        return bool(service and service.process and service.process.poll() is None)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [s for s in self.services if s.health_url]
        while pending:
            for service in list(pending):
                assert service.process is not None
                if service.process.poll() is not None:
                    raise RuntimeError(
                        f"{service.name} exited with code {service.process.returncode} during start; "
                        f"see {self.data_dir / (service.name + '.log')}"
                    )
                try:
                    with urllib.request.urlopen(service.health_url, timeout=1) as response:
                        if response.status == 200:
                            pending.remove(service)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy within {timeout:.0f}s: {', '.join(s.name for s in pending)}")
            time.sleep(0.2)

    def _stop_service(self, name: str, timeout: float = 30) -> None:
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
        """Usage events on the broker past the sink's committed offsets, counted by reading them.

        The embedded broker's high watermark can lag behind what it holds (it reports the start of
        the last record batch), so watermarks alone could call the topic drained too early.
        """
        assert self.broker is not None
        conf = {
            "bootstrap.servers": self.broker.bootstrap,
            "group.id": self.settings.sink_group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
        consumer = Consumer(conf)
        try:
            partitions = consumer.list_topics(USAGE, timeout=5).topics[USAGE].partitions
            committed = consumer.committed([TopicPartition(USAGE, p) for p in partitions], timeout=5)
            consumer.assign(
                [
                    TopicPartition(USAGE, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                    for tp in committed
                ]
            )
            unread, at_end = 0, set()
            deadline = time.monotonic() + 5
            while len(at_end) < len(partitions) and time.monotonic() < deadline:
                for message in consumer.consume(10_000, timeout=0.5):
                    if message.error() is None:
                        unread += 1
                    elif message.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition())
            return unread if len(at_end) == len(partitions) else max(unread, 1)
        finally:
            consumer.close()

    def wait_sink_caught_up(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        lag = self.sink_lag()
        while lag > 0 and time.monotonic() < deadline:
            time.sleep(0.25)
            lag = self.sink_lag()
        return lag


def write_dev_gateway_config(data_dir: Path, upstream_url: str | None) -> tuple[Path, str]:
    """A gateway config with one fresh dev key (header attribution allowed); returns (path, key)."""
    from spendstream.gateway.keys import hash_key, new_key

    key = new_key()
    config: dict[str, object] = {
        "keys": [{"sha256": hash_key(key), "name": "dev", "org": "acme", "allow_header_attribution": True}]
    }
    if upstream_url:
        config["providers"] = {
            "openai": {"kind": "openai", "upstreams": [{"base_url": upstream_url}]},
            "anthropic": {"kind": "anthropic", "upstreams": [{"base_url": upstream_url}]},
        }
    path = data_dir / "gateway.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path, key


def default_policy_path() -> Path:
    """``infra/policy/default.yaml`` of a checkout, or its copy packaged into an installed wheel."""
    checkout = Path(__file__).resolve().parents[3] / "infra" / "policy" / "default.yaml"
    if checkout.is_file():
        return checkout
    from importlib import resources

    return Path(str(resources.files("spendstream") / "_policy" / "default.yaml"))
