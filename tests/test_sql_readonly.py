"""``spendstream sql`` without ``--write`` on the embedded ledger (real chDB): no file, URL, process or remote
table function, no INTO OUTFILE, no settings change, in any statement form; analyst queries still work."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spendstream.analytics.readonly_sql import WriteRefused, sql_report
from spendstream.core.config import Settings, load_settings
from spendstream.core.ledger_store import connect, migrate

ROOT = Path(__file__).resolve().parents[1]
SECRET_LINE = "root-secret-line,do-not-print"


@pytest.fixture
def url_hits() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that records every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a,b\n1,2\n")

        def do_HEAD(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture
def sql_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a data directory with a ledger (a read of one without is an error)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env = {**env, "SPENDSTREAM_DATA_DIR": str(tmp_path / "data")}
    migrate = [sys.executable, "-m", "spendstream.cli", "ledger", "migrate"]
    subprocess.run(migrate, env=env, check=True, capture_output=True, timeout=120)
    return env


def spendstream_sql(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "sql", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_reported_bypasses_are_refused_by_the_cli(
    sql_env: dict[str, str], tmp_path: Path, url_hits: tuple[str, list[str]]
) -> None:
    secret = tmp_path / "shadow.csv"
    secret.write_text(f"{SECRET_LINE}\n1,2\n")
    outfile = tmp_path / "overwritten.txt"
    outfile.write_text("precious\n")
    base, hits = url_hits
    attempts = [
        f"SELECT 'x' INTO OUTFILE '{outfile}' TRUNCATE",
        f"DESCRIBE TABLE file('{secret}', 'CSVWithNames')",
        f"DESCRIBE TABLE url('{base}/x', 'CSVWithNames')",
    ]
    for query in attempts:
        result = spendstream_sql(sql_env, query)
        assert result.returncode == 1, (query, result.stdout, result.stderr)
        assert "refused" in result.stderr and "Traceback" not in result.stderr
        assert SECRET_LINE not in result.stdout + result.stderr
    assert outfile.read_text() == "precious\n"
    assert hits == []


def test_select_of_plain_values_renders_as_a_table(sql_env: dict[str, str]) -> None:
    result = spendstream_sql(sql_env, "SELECT 1 AS x, 2.5 AS y, NULL AS z, [1, 2] AS a")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"x\s+y\s+z\s+a", lines[2]) and re.fullmatch(r"1\s+2\.5\s+-?\s*\[1, 2\]", lines[4])


DECIMALS = (
    "SELECT toDecimal128(0, 9) / 1000000000 AS zero, toDecimal128(7, 9) / 1000000000 AS seven, "
    "toDecimal128(-12000000000000, 9) / 1000000000 AS spent, 7 / 1e9 AS float_seven"
)  # the README's chargeback query reads nano-USD so


def test_amounts_read_as_plain_decimals_in_every_format(sql_env: dict[str, str]) -> None:
    table = spendstream_sql(sql_env, DECIMALS)
    assert table.returncode == 0, table.stderr
    assert re.fullmatch(r"0\.000000000\s+0\.000000007\s+-12000\.000000000\s+0\.000000007", table.stdout.splitlines()[4])
    as_csv = spendstream_sql(sql_env, DECIMALS, "--format", "csv")
    assert as_csv.stdout.splitlines()[1] == "0.000000000,0.000000007,-12000.000000000,0.000000007", as_csv.stdout
    as_json = spendstream_sql(sql_env, DECIMALS, "--format", "json")
    assert '"seven": "0.000000007"' in as_json.stdout and "E-" not in as_json.stdout + table.stdout + as_csv.stdout


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[tuple[Any, Settings]]:
    settings = load_settings(data_dir=tmp_path / "data", kafka_bootstrap="127.0.0.1:1")
    client = connect(settings)
    migrate(client, settings)
    yield client, settings
    client.close()


def _refused(client: Any, settings: Settings, query: str) -> str:
    with pytest.raises(WriteRefused) as refused:
        sql_report(client, settings, query)
    return str(refused.value)


def test_every_statement_form_of_a_table_function_is_refused(
    ledger: tuple[Any, Settings], tmp_path: Path, url_hits: tuple[str, list[str]]
) -> None:
    client, settings = ledger
    secret = tmp_path / "shadow.csv"
    secret.write_text(f"{SECRET_LINE}\n")
    base, hits = url_hits
    f = f"file('{secret}', 'CSV')"
    forms = [
        f"SELECT * FROM {f}",
        f"SELECT file('{secret}')",  # the scalar file() readonly=1 lets through
        f"DESCRIBE {f}",
        f"DESC TABLE url('{base}/d', 'CSV')",
        f"EXPLAIN SELECT * FROM {f}",
        f"EXPLAIN PIPELINE SELECT count() FROM {f}",
        f"EXPLAIN AST DESCRIBE {f}",
        f"WITH t AS (SELECT * FROM {f}) SELECT * FROM t",
        f"SELECT * FROM usage_ledger WHERE provider IN (SELECT c1 FROM {f})",
        f"SELECT 1 UNION ALL SELECT count() FROM {f}",
        f"SELECT 1 INTERSECT SELECT 1 FROM url('{base}/i', 'CSV')",
        f"/* comment */ -- another\n SeLeCt * FROM FiLe('{secret}', 'CSV')",
        f"SELECT * FROM `file`('{secret}', 'CSV')",
        f"SELECT * FROM (SELECT 1) AS a JOIN url('{base}/j', 'CSV') AS b ON 1",
        f"SELECT * FROM s3('{base}/s3/x.csv', 'CSV')",
        "SELECT * FROM executable('id', 'TSV', 'x String')",
        "SELECT * FROM remote('127.0.0.1:1', system.one)",
        "SELECT * FROM mysql('127.0.0.1:1', 'd', 't', 'u', 'p')",
        "SELECT * FROM postgresql('127.0.0.1:1', 'd', 't', 'u', 'p')",
        "SELECT * FROM hdfs('hdfs://127.0.0.1:1/x', 'CSV')",
        "SELECT * FROM input('x String')",
        f"SELECT * FROM view(SELECT * FROM {f})",
    ]
    for query in forms:
        message = _refused(client, settings, query)
        assert "() refused" in message, (query, message)
        assert SECRET_LINE not in message
    assert hits == []


def test_into_outfile_and_writes_are_refused_in_every_form(ledger: tuple[Any, Settings], tmp_path: Path) -> None:
    client, settings = ledger
    target = tmp_path / "out.txt"
    forms = [
        f"SELECT 1 INTO OUTFILE '{target}'",
        f"select 1 into outfile '{target}' TRUNCATE",
        f"SELECT * FROM (SELECT 1) INTO OUTFILE '{target}' AND STDOUT",
        f"EXPLAIN SELECT 1 INTO OUTFILE '{target}'",
        f"SHOW TABLES INTO OUTFILE '{target}'",
        f"WITH 1 AS x SELECT x INTO OUTFILE '{target}' COMPRESSION 'gzip'",
        f"SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{target}'",
    ]
    for query in forms:
        assert "INTO OUTFILE refused" in _refused(client, settings, query), query
    assert not target.exists()
    for query in ("INSERT INTO FUNCTION file('/tmp/x.csv') SELECT 1", "EXPLAIN AST INSERT INTO budgets SELECT *"):
        assert "INSERT statement refused" in _refused(client, settings, query)
    for query in ("SELECT 1; DROP TABLE budgets; SELECT 2", "SELECT 1; DROP TABLE budgets"):  # chDB runs each statement
        assert "Multi-statements" in _refused(client, settings, query)
    assert client.query("EXISTS TABLE spendstream.budgets").result_rows == [(1,)]


def test_settings_cannot_be_changed(ledger: tuple[Any, Settings]) -> None:
    client, settings = ledger
    for query in (
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 SETTINGS max_threads = 1",
        "SELECT * FROM (SELECT 1 SETTINGS readonly = 0)",  # readonly=1 alone lets this one through
        "SET readonly = 0",
        "EXPLAIN SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 /*",  # an open comment must not swallow the readonly setting
    ):
        with pytest.raises(Exception, match=r"(?i)readonly|refused|comment"):
            sql_report(client, settings, query)
    assert sql_report(client, settings, "SELECT getSetting('readonly') AS r").rows == [{"r": 1}]


def test_reads_an_analyst_needs_still_work(ledger: tuple[Any, Settings]) -> None:
    client, settings = ledger
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Queries a finance analyst can paste", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in re.sub(r"--[^\n]*", "", block).split(";") if q.strip()]
    assert len(queries) >= 3
    for query in queries:
        sql_report(client, settings, query)
    for query in (
        "SHOW TABLES",
        "DESCRIBE TABLE usage_ledger",
        "EXISTS TABLE budgets",
        "EXPLAIN SELECT team, sum(cost_nanos) FROM usage_ledger FINAL GROUP BY team",
        "WITH (SELECT count() FROM budgets) AS n SELECT n, number FROM numbers(3)",
        "SELECT format('{} usd', toString(1)) AS s",
        "SELECT 'INTO OUTFILE file(x)' AS literal_text",
    ):
        sql_report(client, settings, query)


def test_a_statement_that_runs_past_its_time_limit_is_cancelled(ledger: tuple[Any, Settings]) -> None:
    client, settings = ledger
    endless = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 1"
    with pytest.raises(Exception, match="Timeout exceeded"):
        sql_report(client, settings, endless, timeout_s=1)


def test_a_statement_that_would_use_more_memory_than_allowed_is_stopped(ledger: tuple[Any, Settings]) -> None:
    """One read-only query folded a 2 M array in one block: 8.7 GB, and with 8 M all the machine's memory."""
    client, settings = ledger
    hungry = "SELECT arrayFold((acc, x) -> cityHash64(acc, x), range(2000000), toUInt64(0))"
    with pytest.raises(Exception, match="MEMORY_LIMIT_EXCEEDED"):
        sql_report(client, settings, hungry, max_memory_mb=200)


def test_a_read_the_engine_cannot_cancel_ends_the_command_saying_why() -> None:
    """The engine checks its time limit between blocks; a read stuck in one block ends with the process that runs
    the embedded engine (``spendstream sql`` arms this for every read)."""
    stuck = (
        "import time\n"
        "from spendstream.analytics.commands import _end_after\n"
        "_end_after(0.3, 'the statement ran past --timeout 1; stopped')\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert done.stderr.strip() == "spendstream sql: the statement ran past --timeout 1; stopped"


def test_an_abbreviated_flag_is_refused_not_guessed(sql_env: dict[str, str]) -> None:
    """``--wr`` must not quietly become ``--write`` (nor ``--time`` ``--timeout``)."""
    for flag in ("--wr", "--time=5"):
        result = spendstream_sql(sql_env, flag, "SELECT 1")
        assert result.returncode == 2
        assert "unrecognized arguments" in result.stderr and "Traceback" not in result.stderr
