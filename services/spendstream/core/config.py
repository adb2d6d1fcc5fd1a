"""The one configuration object, read from ``SPENDSTREAM_*`` environment variables.

The CLI, every service and docker-compose use these names, so a setting means the same
thing on a laptop running the embedded runtime and in a production deployment.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from spendstream.core.periods import known_timezone
from spendstream.core.record_signature import (
    SIGNING_KEY_FILE,
    VERIFY_KEY_FILE,
    RecordSigner,
    RecordVerifier,
    SignatureKeyError,
)

T = TypeVar("T")


class ConfigError(Exception):
    """Configuration that cannot work; the message names the setting and the fix."""


class Settings(BaseSettings):
    """Every setting of every service. Environment variable = ``SPENDSTREAM_`` + upper-cased name."""

    model_config = SettingsConfigDict(env_prefix="SPENDSTREAM_", extra="ignore", validate_default=True)

    # -- shared ---------------------------------------------------------------------------
    config_file: Path | None = Field(None, description="Optional YAML file with any of these settings.")
    data_dir: Path = Field(Path(".spendstream"), description="Where the embedded runtime keeps its state.")
    dev_stop_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="How long `spendstream dev` waits on Ctrl-C for the ledger to catch up and for each service "
        "to stop; usage events still unwritten then are saved in the data directory and replayed at the next start.",
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client connects."
    )
    kafka_sasl_mechanism: str | None = Field(None, description="e.g. PLAIN, SCRAM-SHA-512.")
    kafka_sasl_username: str | None = Field(None, description="SASL user for every Kafka client.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    kafka_ssl_ca_location: Path | None = Field(None, description="CA bundle for SSL connections to Kafka.")
    schema_registry_url: str | None = Field(
        None,
        description="If set, values use Confluent Schema Registry framing instead of single-object Avro.",
    )
    clickhouse_dsn: str | None = Field(
        None, description="clickhouse-connect DSN: chdb:///dir (embedded) or http(s)://user:pass@host:8123."
    )
    clickhouse_database: str = Field("spendstream", description="Database holding the ledger tables and views.")
    policy: Path | None = Field(None, description="Policy YAML file.")
    signing_key: Path | None = Field(
        None,
        description="PEM file of the Ed25519 private key that signs decisions, heartbeats and policies (the "
        "processor, the ledger sink and whoever applies policies hold it; `spendstream keygen` writes one); default "
        "`DATA_DIR/signing-key.pem` if it exists.",
    )
    verify_key: Path | None = Field(
        None,
        description="PEM file of its public key: edges and the processor apply only decisions and policies it "
        "verifies; default `DATA_DIR/verify-key.pem` if it exists. Without one, records are not checked (a warning "
        "at start).",
    )
    price_data_file: Path | None = Field(
        None,
        description="List prices in genai-prices' data format, used instead of the bundled ones (default: "
        "prices.json in the data directory, which `spendstream prices import` writes, when it exists).",
    )
    timezone: str = Field(
        "UTC",
        description="Timezone of the default policy (no budgets) in force before any policy is applied, and so of "
        "the reports until then. Once a policy is in force, budgets, reports (CLI, API, dashboard) and report "
        "e-mails all cut days, weeks and months in the policy's `timezone`, whatever this says (dev, processor and "
        "policy validate/apply warn when it is set to another).",
    )

    # -- topics ---------------------------------------------------------------------------
    usage_partitions: int = Field(
        6, ge=1, le=1024, description="Partitions of spendstream.usage: the ceiling on parallel processors and sinks."
    )
    replication_factor: int = Field(1, ge=1, le=16, description="Replication of topics created by `topics create`.")

    # -- edge emitter ---------------------------------------------------------------------
    spool_dir: Path | None = Field(None, description="Where an Emitter spools events while the broker is unreachable.")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Upper bound of the disk spool.")

    # -- ledger sink ----------------------------------------------------------------------
    sink_group: str = Field("spendstream-sink", description="Consumer group of the ledger sinks.")
    sink_batch_size: int = Field(20_000, ge=1, le=1_000_000, description="Most events per ledger insert.")
    sink_batch_ms: int = Field(500, ge=1, le=60_000, description="Longest wait to fill a ledger batch.")
    ledger_ttl_months: int = Field(13, ge=1, le=1200, description="Ledger retention (TTL), applied at migration.")
    max_future_skew_s: int = Field(300, ge=0, description="Events further in the future are rejected.")

    # -- processor ------------------------------------------------------------------------
    processor_allowed_lateness_s: int = Field(
        86_400,
        ge=0,
        description="Events arriving later than this after occurred_at are not counted in budgets (they go to the DLQ; "
        "the ledger records them, and the API's 202 lists them).",
    )
    processor_batch_size: int = Field(
        5_000,
        ge=1,
        le=100_000,
        description="Usage events per owned partition in one processor round: a round reads up to this many times "
        "the worker's partition count, from whichever partitions have them. A worker that is behind fills its "
        "rounds: bigger ones write fewer changelog records per event but hold ~0.7 KB of memory per event (20000: "
        "~10 % more events/s while catching up, ~60 MB more peak memory per worker of 6 partitions).",
    )
    processor_batch_ms: int = Field(
        50, ge=1, le=10_000, description="Longest wait to fill a processor batch (bigger: fewer writes, more latency)."
    )
    processor_dedup_horizon_s: int = Field(
        900,
        ge=0,
        description="Arrival time within which the processor skips a re-sent event_id (memory: ~2 bytes per id in "
        "the horizon, the rest in files under the data directory); a copy arriving later is counted twice in the "
        "spend windows, never in the ledger.",
    )
    processor_dedup_memory_ids: int = Field(
        65_536,
        ge=1,
        description="A run of this many ids of a usage partition's dedup horizon moves from process memory (40 bytes "
        "per id) to a file under the data directory (page cache, not the process); a partition keeps fewer than "
        "twice as many in memory.",
    )

    # -- service ports --------------------------------------------------------------------
    gateway_host: str = Field("127.0.0.1", description="Gateway listen address.")
    gateway_port: int = Field(8080, ge=0, le=65535, description="Gateway listen port.")
    gateway_workers: int = Field(
        1,
        ge=0,
        le=256,
        description="Gateway processes serving the port (SO_REUSEPORT), each with its own Enforcer and Emitter; "
        "0: one per CPU.",
    )
    stub_upstream_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Listen port of the stub LLM provider `spendstream dev --stub-upstream` starts (0: a free one; "
        "`dev` prints it).",
    )
    api_host: str = Field("127.0.0.1", description="API and dashboard listen address.")
    api_port: int = Field(8081, ge=0, le=65535, description="API and dashboard listen port.")
    api_header_timeout_s: float = Field(
        20.0,
        gt=0,
        description="An API connection must complete its request head within this many seconds of opening or of "
        "its previous response, else it is closed (slow-header clients; idle keep-alive connections too); a "
        "request's body must arrive within three times as long (else 408).",
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token for admin endpoints.")
    api_tokens_file: Path | None = Field(
        None,
        description="Hashed API tokens (viewer, ingest, approver, admin); `spendstream api token create` adds one.",
    )
    api_token: SecretStr | None = Field(
        None,
        description="The token the CLI presents to the API as its principal (`spendstream budget`, `feature`): "
        "who requests, approves or denies is that token's name.",
    )

    # -- metrics --------------------------------------------------------------------------
    metrics_host: str = Field(
        "127.0.0.1", description="Listen address of the Prometheus /metrics server of the sink and processor."
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the /metrics server of the sink and processor (unset: none). "
        "The gateway and the API serve /metrics on their own port. `spendstream dev` serves the sink's on it, "
        "the processor's on the next port and, with gateway workers, worker i's on the port + 2 + i (unset: free "
        "ports, which it prints).",
    )
    metrics_lag_interval_s: float = Field(
        5.0, gt=0, le=300, description="How often the sink samples its consumer group's lag for /metrics."
    )

    # -- OpenTelemetry ----------------------------------------------------------------------
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        # the standard OTEL_EXPORTER_OTLP_ENDPOINT too (env names are case-insensitive); the SPENDSTREAM_ one wins
        validation_alias=AliasChoices("SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"),
        description="OTLP/HTTP base URL (e.g. http://collector:4318; else the standard OTEL_EXPORTER_OTLP_ENDPOINT) "
        "the gateway sends GenAI spans and metrics to; unset: no telemetry, and the OpenTelemetry SDK is not loaded.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = _config_file_from(init_settings, env_settings)
        if config_file is not None:
            sources += (InitSettingsSource(settings_cls, init_kwargs=read_config_file(config_file)),)
        return sources

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    _timezone = field_validator("timezone")(known_timezone)

    @field_validator("otel_exporter_otlp_endpoint")
    @classmethod
    def _otlp_endpoint_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https") or not rest.strip("/"):
            raise ValueError(
                "expected an http(s) URL such as http://collector:4318 (also read from OTEL_EXPORTER_OTLP_ENDPOINT)"
            )
        return value.rstrip("/")

    @property
    def timezone_set(self) -> str | None:
        """``timezone`` when it was set (environment, config file or argument), else None: only a timezone someone
        chose is worth a warning when the policy in force has another."""
        return self.timezone if "timezone" in self.model_fields_set else None

    @cached_property
    def ledger_dsn(self) -> str:
        """The ClickHouse DSN in force: the configured one, else an embedded chDB directory."""
        return self.clickhouse_dsn or f"chdb://{(self.data_dir / 'ledger').resolve()}"

    @cached_property
    def api_tokens_path(self) -> Path:
        return self.api_tokens_file or self.data_dir / "api-tokens.yaml"

    @cached_property
    def api_address_path(self) -> Path:
        """Where a running API writes its address and a read token for the CLI of the same data directory."""
        return self.data_dir / "api.json"

    @cached_property
    def price_data_path(self) -> Path:
        return self.price_data_file or self.data_dir / "prices.json"

    @cached_property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    def record_signer(self) -> RecordSigner | None:
        """The signer of governing records: ``signing_key``, else the data directory's key if there is one."""
        path = self._key_path(self.signing_key, SIGNING_KEY_FILE, "SPENDSTREAM_SIGNING_KEY")
        return None if path is None else _loaded(RecordSigner.from_file, path, "SPENDSTREAM_SIGNING_KEY")

    def record_verifier(self) -> RecordVerifier | None:
        """The verifier of governing records: ``verify_key``, else the data directory's key if there is one."""
        path = self._key_path(self.verify_key, VERIFY_KEY_FILE, "SPENDSTREAM_VERIFY_KEY")
        return None if path is None else _loaded(RecordVerifier.from_file, path, "SPENDSTREAM_VERIFY_KEY")

    def _key_path(self, configured: Path | None, default_name: str, variable: str) -> Path | None:
        if configured is not None:
            if not configured.is_file():
                raise ConfigError(
                    f"{variable}: no such file: {configured} (`spendstream keygen DIR` writes a key pair)"
                )
            return configured
        default = self.data_dir / default_name
        return default if default.is_file() else None

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka settings for the broker connection (security included), shared by every client.

        librdkafka's own log lines go through Python logging (``spendstream.kafka``), so services
        format, filter and capture them like every other log line.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
            "logger": logging.getLogger("spendstream.kafka"),
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = str(self.kafka_ssl_ca_location)
        return conf


def _loaded(load: Callable[[Path], T], path: Path, variable: str) -> T:
    try:
        return load(path)
    except SignatureKeyError as exc:
        raise ConfigError(f"{variable}: {exc}") from None


def _config_file_from(*sources: PydanticBaseSettingsSource) -> Path | None:
    for source in sources:
        value = source().get("config_file")
        if value:
            return Path(value)
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of ``SPENDSTREAM_CONFIG_FILE``. A file that cannot be read, is not YAML or is not a mapping of
    setting names is a ``ConfigError`` naming the file and the line: every command reads the settings first, so a
    traceback here would be what every command prints."""
    source = f"SPENDSTREAM_CONFIG_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"SPENDSTREAM_CONFIG_FILE: no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} is a directory: name a YAML file of settings") from None
    except OSError as exc:
        raise ConfigError(f"{source} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}, line {line}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        where = f", line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        context = ""
        if exc.context and exc.context_mark is not None:
            context = f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        problem = exc.problem or exc.context or "cannot be parsed"
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        kind = "a list" if isinstance(document, list) else f"a single value ({type(document).__name__})"
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{source}, line {line}: expected setting names and values, one per line (`api_port: 8081`), got {kind}"
        )
    return document


def config_file_lines(path: Path) -> dict[str, int]:
    """Each top-level key of a config file (already read by ``read_config_file``) and the line it is on, for
    messages; empty if the file cannot be read again."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def settings_reference_markdown() -> str:
    """The configuration table of the README, generated from ``Settings`` so the two cannot drift."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else f"`{default}`"
        if name == "clickhouse_dsn":
            shown = "`chdb://DATA_DIR/ledger`"
        if name == "spool_dir":
            shown = "`DATA_DIR/spool`"
        if name == "api_tokens_file":
            shown = "`DATA_DIR/api-tokens.yaml`"
        rows.append(f"| `SPENDSTREAM_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


# SPENDSTREAM_* variables that are not settings: read by one command each (documented with it).
OTHER_VARIABLES = frozenset({"SPENDSTREAM_GATEWAY_CONFIG", "SPENDSTREAM_BROKER_BIN"})


def setting_variables() -> frozenset[str]:
    """Every environment variable a setting is read from (upper case: the names are case-insensitive)."""
    return frozenset(f"SPENDSTREAM_{name.upper()}" for name in Settings.model_fields)


def unknown_names_problems(environ: Mapping[str, str]) -> list[str]:
    """One line per ``SPENDSTREAM_*`` variable, and per key of ``SPENDSTREAM_CONFIG_FILE``, that names no setting.

    Why: a setting spelt wrong is otherwise ignored without a word, and the service runs on its default; for
    ``SPENDSTREAM_POLCY`` that is a gateway enforcing no policy at all."""
    known = setting_variables()
    variables = sorted(name for name in environ if name.upper().startswith("SPENDSTREAM_"))
    problems = [
        f"{name} is not a spendstream setting{_did_you_mean(name.upper(), known | OTHER_VARIABLES)}"
        for name in variables
        if name.upper() not in known | OTHER_VARIABLES
    ]
    config_file = next((environ[name] for name in variables if name.upper() == "SPENDSTREAM_CONFIG_FILE"), None)
    if config_file:
        try:
            document = read_config_file(Path(config_file))
        except ConfigError:
            return problems  # reading the settings reports what is wrong with the file itself
        fields = frozenset(Settings.model_fields)
        lines = config_file_lines(Path(config_file))
        problems += [
            f"{config_file}{_line_text(lines.get(str(key)))}: {key!r} is not a spendstream setting"
            f"{_did_you_mean(str(key).lower().removeprefix('spendstream_'), fields)}"
            for key in document
            if str(key) not in fields
        ]
    return problems


def _line_text(line: int | None) -> str:
    return "" if line is None else f", line {line}"


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """The closest known name, compared without the shared prefix (it would make every name look alike)."""
    prefix = "SPENDSTREAM_" if name.startswith("SPENDSTREAM_") else ""
    stems = {candidate.removeprefix(prefix): candidate for candidate in known}
    close = difflib.get_close_matches(name.removeprefix(prefix), sorted(stems), n=1, cutoff=0.75)
    return f" (did you mean {stems[close[0]]}?)" if close else " (see the README's Configuration table)"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one message per bad variable; a ``SPENDSTREAM_*``
    variable or a config file key that names no setting is refused too (``unknown_names_problems``)."""
    unknown = unknown_names_problems(os.environ)
    if unknown:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(unknown))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        from_file = _config_file_keys(overrides)
        for error in exc.errors():
            field = str(error["loc"][0]).upper() if error["loc"] else "?"
            variable = field if field.startswith("SPENDSTREAM_") else f"SPENDSTREAM_{field}"  # an alias names it whole
            name = variable.removeprefix("SPENDSTREAM_").lower()
            where = from_file.get(name) if name not in overrides and not _in_environment(name) else None
            problems.append(f"{where or variable}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def _in_environment(name: str) -> bool:
    """Whether an environment variable sets setting ``name`` (it wins over the config file)."""
    field = Settings.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    names = {f"SPENDSTREAM_{name.upper()}"}
    if isinstance(alias, AliasChoices):
        names |= {str(choice).upper() for choice in alias.choices}
    return any(variable.upper() in names for variable in os.environ)


def _config_file_keys(overrides: Mapping[str, Any]) -> dict[str, str]:
    """Setting name -> ``FILE, line N: name`` for each key of the config file, so that a bad value read from it is
    named where it is written rather than as an environment variable nobody set."""
    configured = overrides.get("config_file") or next(
        (value for variable, value in os.environ.items() if variable.upper() == "SPENDSTREAM_CONFIG_FILE"), None
    )
    if not configured:
        return {}
    path = Path(configured)
    try:
        keys = read_config_file(path)
    except ConfigError:
        return {}
    lines = config_file_lines(path)
    return {str(key): f"{path}{_line_text(lines.get(str(key)))}: {key}" for key in keys}
