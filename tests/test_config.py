import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spendstream.core.config import ConfigError, load_settings


def test_defaults_point_at_embedded_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPENDSTREAM_CLICKHOUSE_DSN", raising=False)
    settings = load_settings(data_dir=Path("/tmp/x"))
    assert settings.ledger_dsn == "chdb:///tmp/x/ledger"
    assert settings.spool_path == Path("/tmp/x/spool")


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE_DSN", "http://clickhouse:8123")
    monkeypatch.setenv("SPENDSTREAM_SINK_BATCH_SIZE", "123")
    settings = load_settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.ledger_dsn == "http://clickhouse:8123"
    assert settings.sink_batch_size == 123


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SPENDSTREAM_SINK_BATCH_SIZE", "many"),
        ("SPENDSTREAM_KAFKA_BOOTSTRAP", "no-port-here"),
        ("SPENDSTREAM_USAGE_PARTITIONS", "0"),
        ("SPENDSTREAM_KAFKA_SECURITY_PROTOCOL", "TELNET"),
        ("SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("SPENDSTREAM_TIMEZONE", "Mars/Base"),
        ("SPENDSTREAM_TIMEZONE", "../etc/passwd"),
    ],
)
def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_otlp_endpoint_is_read_from_the_standard_variable_unless_spendstream_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert load_settings().otel_exporter_otlp_endpoint is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert load_settings().otel_exporter_otlp_endpoint == "http://collector:4318"
    monkeypatch.setenv("SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.example:4318")
    assert load_settings().otel_exporter_otlp_endpoint == "https://otel.example:4318"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")
    monkeypatch.delenv("SPENDSTREAM_OTEL_EXPORTER_OTLP_ENDPOINT")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        load_settings()


def test_config_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text("sink_batch_ms: 42\ntimezone: Europe/Berlin\n")
    monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", str(config))
    settings = load_settings()
    assert settings.sink_batch_ms == 42
    assert settings.timezone == "Europe/Berlin"


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="SPENDSTREAM_CONFIG_FILE"):
        load_settings()


def test_sasl_settings_reach_the_kafka_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SPENDSTREAM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SPENDSTREAM_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("SPENDSTREAM_KAFKA_SASL_PASSWORD", "s3cret")
    conf = load_settings().kafka_client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.password"] == "s3cret"
    assert "s3cret" not in repr(load_settings())


def test_a_misspelt_variable_is_refused_naming_the_setting_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ignored, SPENDSTREAM_POLCY would leave every service running without the policy it was meant to enforce.
    monkeypatch.setenv("SPENDSTREAM_POLCY", "/etc/spendstream/policy.yaml")
    with pytest.raises(
        ConfigError, match=r"SPENDSTREAM_POLCY is not a spendstream setting \(did you mean SPENDSTREAM_POLICY\?\)"
    ):
        load_settings()


def test_a_variable_like_no_setting_points_at_the_configuration_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_WHATEVER", "1")
    with pytest.raises(ConfigError, match=r"SPENDSTREAM_WHATEVER is not a spendstream setting \(see the README"):
        load_settings()


def test_variables_read_outside_the_settings_and_any_case_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_GATEWAY_CONFIG", "/nowhere/gateway.yaml")
    monkeypatch.setenv("SPENDSTREAM_BROKER_BIN", "/nowhere/tansu")
    monkeypatch.setenv("spendstream_sink_batch_ms", "42")  # setting names are case-insensitive
    assert load_settings().sink_batch_ms == 42


@pytest.mark.parametrize(
    ("text", "key", "meant"),
    [("sink_batch_ms: 42\nkafka_bootstrp: kafka:9092\n", "kafka_bootstrp", "kafka_bootstrap"),
     ("SPENDSTREAM_POLICY: /etc/policy.yaml\n", "SPENDSTREAM_POLICY", "policy")],
)  # fmt: skip
def test_a_misspelt_key_of_the_config_file_is_refused_naming_the_key_meant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, key: str, meant: str
) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text(text)
    monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' is not a spendstream setting (did you mean {meant}?)")):
        load_settings()


def test_the_cli_refuses_a_misspelt_variable_before_doing_anything(tmp_path: Path) -> None:
    env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path), "SPENDSTREAM_PROCESOR_BATCH_SIZE": "500"}
    done = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "policy", "validate", "/nowhere.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SPENDSTREAM_PROCESOR_BATCH_SIZE is not a spendstream setting" in done.stderr
    assert "did you mean SPENDSTREAM_PROCESSOR_BATCH_SIZE?" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"sink_batch_ms: 42\napi_port: [1,2\n", r", line 3, column 1: not valid YAML: expected ',' or ']'.*line 2"),
        (b"- api_port\n- 8081\n", r", line 1: expected setting names and values.*got a list"),
        (b"8081\n", r", line 1: expected setting names and values.*got a single value"),
        (b"timezone: UTC\napi_host: \xff\n", r", line 2: not UTF-8 text"),
        (b"data_dir: !!python/object/apply:os.system [ls]\n", r", line 1, column 11: not valid YAML: could not"),
    ],
)  # fmt: skip
def test_a_config_file_that_is_not_a_yaml_mapping_is_refused_naming_the_file_and_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes, problem: str
) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_bytes(content)
    monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match=rf"^SPENDSTREAM_CONFIG_FILE {re.escape(str(config))}{problem}"):
        load_settings()


def test_a_config_file_that_cannot_be_read_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", str(tmp_path))
    with pytest.raises(ConfigError, match=f"SPENDSTREAM_CONFIG_FILE {re.escape(str(tmp_path))} is a directory"):
        load_settings()
    if Path("/proc/self/mem").exists():  # a file every read of fails (root reads a file of mode 000)
        monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", "/proc/self/mem")
        with pytest.raises(ConfigError, match="SPENDSTREAM_CONFIG_FILE /proc/self/mem cannot be read: "):
            load_settings()


def test_a_bad_value_in_the_config_file_is_named_where_it_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text("timezone: UTC\napi_port: lots\n")
    monkeypatch.setenv("SPENDSTREAM_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match=re.escape(f"{config}, line 2: api_port: Input should be a valid integer")):
        load_settings()
    monkeypatch.setenv("SPENDSTREAM_API_PORT", "many")  # the environment wins over the file: its value is the bad one
    with pytest.raises(ConfigError, match=r"SPENDSTREAM_API_PORT: .*'many'"):
        load_settings()


def test_every_command_refuses_a_bad_config_file_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("api_port: [1,2\n")
    env = {**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path), "SPENDSTREAM_CONFIG_FILE": str(config)}
    for argv in (("report", "chargeback"), ("ledger", "migrate")):
        done = subprocess.run(
            [sys.executable, "-m", "spendstream.cli", *argv], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"spendstream: SPENDSTREAM_CONFIG_FILE {config}, line 2, column 1: not valid")
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "ledger").exists()  # nothing was started or written
