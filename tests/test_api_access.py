"""Who may use the API, over real sockets to a running ``spendstream api`` (real broker, real chDB):
ingest needs an ingest token within its scope, bodies are JSON only, no CORS, reports and the dashboard
need a read token, absurd dates and amounts get a 400 naming the parameter, and the CLI reads only the
API of its own data directory."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spendstream.runtime.embedded_broker import EmbeddedBroker, free_port
from test_gateway import read_usage

ADMIN_TOKEN = "admin-s3cret-for-tests"


def event(**kw: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC).isoformat(), "org": "acme",
        "team": "marketing", "provider": "openai", "model_requested": "gpt-4o-mini", "input_tokens": 10,
        "output_tokens": 2, **kw,
    }  # fmt: skip


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
    """One request on a fresh connection; header names use ``_`` for ``-``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def post_json(port: int, payload: Any, token: str | None = None, **headers: str) -> Reply:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return call(port, "POST", "/v1/usage", json.dumps(payload).encode(), Content_Type="application/json",
                **auth, **headers)  # fmt: skip


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendstream.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    return {**env, "SPENDSTREAM_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class RunningApi:
    port: int
    env: dict[str, str]
    data_dir: Path


@pytest.fixture
def api(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[RunningApi]:
    """``spendstream api`` as a user starts it, on a free port, owning the embedded ledger of its data dir."""
    port = free_port()
    data_dir = tmp_path / "stack-a"
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: access\norg: acme\n")
    env = base_env(
        data_dir, SPENDSTREAM_KAFKA_BOOTSTRAP=broker.bootstrap, SPENDSTREAM_API_PORT=str(port),
        SPENDSTREAM_ADMIN_TOKEN=ADMIN_TOKEN, SPENDSTREAM_API_HEADER_TIMEOUT_S="1", SPENDSTREAM_POLICY=str(policy),
    )  # fmt: skip
    log = (tmp_path / "api.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "spendstream.cli", "api"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if call(port, "GET", "/healthz").status == 200 and (data_dir / "api.json").exists():
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        yield RunningApi(port, env, data_dir)
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def create_token(env: dict[str, str], *args: str) -> str:
    done = cli(env, "api", "token", "create", *args)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert re.fullmatch(r"ss-api-[\w-]{40,}", token), done.stdout
    return token


def no_cors_headers(reply: Reply) -> None:
    assert not [h for h in reply.headers if h.startswith("access-control-")], reply.headers


def test_ingest_needs_a_token_json_and_the_token_scope(api: RunningApi, broker: EmbeddedBroker) -> None:
    marketing = create_token(api.env, "--role", "ingest", "--team", "marketing")
    viewer = create_token(api.env, "--role", "viewer")
    tokens_file = (api.data_dir / "api-tokens.yaml").read_text()
    assert marketing not in tokens_file and viewer not in tokens_file  # hashed at rest, like virtual keys
    assert (api.data_dir / "api-tokens.yaml").stat().st_mode & 0o077 == 0

    # No token: refused, and nothing lands.
    unauthenticated = post_json(api.port, event(cost_nanos=7_000 * 10**9))
    assert unauthenticated.status == 401 and "ingest" in unauthenticated.json()["error"]
    assert unauthenticated.headers["www-authenticate"].startswith("Bearer")
    # What a web page's fetch(..., {mode: "no-cors"}) can send: text/plain, no Authorization, an Origin.
    page = call(api.port, "POST", "/v1/usage", json.dumps(event(cost_nanos=7_000 * 10**9)).encode(),
                Content_Type="text/plain;charset=UTF-8", Origin="http://evil.example")  # fmt: skip
    assert page.status == 401
    no_cors_headers(page)
    # Even with a token, only JSON bodies; forms and text are what a page could send without a preflight.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        typed = call(api.port, "POST", "/v1/usage", json.dumps(event()).encode(), Content_Type=content_type,
                     Authorization=f"Bearer {marketing}")  # fmt: skip
        assert typed.status == 415 and "application/json" in typed.json()["error"], content_type
    preflight = call(api.port, "OPTIONS", "/v1/usage", Origin="http://evil.example",
                     Access_Control_Request_Method="POST", Access_Control_Request_Headers="authorization")  # fmt: skip
    assert preflight.status >= 400
    no_cors_headers(preflight)

    # A scoped token cannot post for another team, not even inside a batch with its own team.
    other_team = post_json(api.port, [event(), event(team="sales")], marketing)
    assert other_team.status == 403
    assert other_team.json()["problems"] == [
        {
            "index": 1,
            "field": "team",
            "message": "token 'ingest-marketing' may report for team marketing only, not 'sales'",
        }
    ]
    # Nor charge another department: an event's division replaces its team's division from the policy.
    other_division = post_json(api.port, event(division="engineering"), marketing)
    assert other_division.status == 403
    assert other_division.json()["problems"][0]["field"] == "division"
    # Nor another org: it would step out of the org's budgets and hard caps the same way.
    other_org = post_json(api.port, event(org="shadow"), marketing)
    assert other_org.status == 403 and other_org.json()["problems"][0]["field"] == "org"
    # A token limited to its features and customers cannot burn another feature's or customer's budget.
    chatbot = create_token(api.env, "--role", "ingest", "--team", "marketing", "--feature", "chatbot",
                           "--customer", "acme")  # fmt: skip
    other_feature = post_json(api.port, event(feature="search", customer="acme"), chatbot)
    assert other_feature.status == 403 and other_feature.json()["problems"][0]["field"] == "feature"
    other_customer = post_json(api.port, event(feature="chatbot", customer="globex"), chatbot)
    assert other_customer.status == 403 and other_customer.json()["problems"][0]["field"] == "customer"
    listed = cli(api.env, "api", "token", "list").stdout
    assert "team=marketing feature=chatbot customer=acme" in listed
    assert post_json(api.port, event(), viewer).status == 403  # a viewer cannot post
    poison = post_json(api.port, event(input_tokens=10**16), marketing)  # a cost that could overflow Int64
    assert poison.status == 400 and poison.json()["problems"][0]["field"] == "input_tokens"
    too_costly = post_json(api.port, event(cost_nanos=2 * 10**18), marketing)
    assert too_costly.status == 400 and too_costly.json()["problems"][0]["field"] == "cost_nanos"

    first = event()
    assert post_json(api.port, first, marketing).status == 202
    accepted = [first["event_id"]]
    # A token created while the API runs works without a restart; a revoked one stops working.
    later = create_token(api.env, "--role", "ingest", "--name", "late", "--provider", "openai")
    deadline = time.monotonic() + 10
    while (reply := post_json(api.port, (sent := event()), later)).status != 202:
        assert reply.status == 401 and time.monotonic() < deadline, reply.body
        time.sleep(0.2)
    accepted.append(sent["event_id"])
    assert cli(api.env, "api", "token", "revoke", "late").returncode == 0
    deadline = time.monotonic() + 10
    while (reply := post_json(api.port, (sent := event()), later)).status != 401:
        assert reply.status == 202 and time.monotonic() < deadline
        accepted.append(sent["event_id"])  # posted before the API saw the revocation
        time.sleep(0.2)
    published = read_usage(broker.bootstrap, len(accepted))
    assert sorted(str(e["event_id"]) for e in published) == sorted(accepted)  # nothing refused landed
    assert all(e["cost_nanos"] is None and e["input_tokens"] == 10 for e in published)


def test_reports_and_dashboard_need_a_read_token(api: RunningApi) -> None:
    viewer = create_token(api.env, "--role", "viewer")
    ingest = create_token(api.env, "--role", "ingest")
    assert call(api.port, "GET", "/v1/reports/weekly").status == 401
    assert call(api.port, "GET", "/v1/reports/weekly", Authorization=f"Bearer {ingest}").status == 403
    report = call(api.port, "GET", "/v1/reports/weekly", Authorization=f"Bearer {viewer}")
    assert report.status == 200 and report.json()["report"] == "weekly"
    assert call(api.port, "GET", "/v1/reports/weekly", Authorization=f"Bearer {ADMIN_TOKEN}").status == 200
    assert call(api.port, "GET", "/healthz").status == 200

    assert call(api.port, "GET", "/").status == 401
    assert call(api.port, "GET", "/?token=ss-api-not-a-token").status == 401
    assert call(api.port, "GET", f"/?token={ingest}").status == 403  # a known token of another role (was 401)
    opened = call(api.port, "GET", f"/?token={viewer}")  # the URL `spendstream dev` prints
    assert opened.status == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = call(api.port, "GET", "/", Cookie=cookie.split(";")[0], Origin="http://evil.example")
    assert page.status == 200 and b"<html" in page.body
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    no_cors_headers(page)
    # The cookie reads; it never posts (a form on another site cannot use it).
    assert post_json(api.port, event(), Cookie=cookie.split(";")[0]).status == 401


@pytest.mark.parametrize(
    ("path", "field", "accepted"),
    [
        ("/v1/reports/top?to=9999-12-31", "to", "1970-01-01 and 2199-12-31"),
        ("/v1/reports/weekly?as_of=0001-01-07", "as_of", "1970-01-01 and 2199-12-31"),
        ("/v1/reports/chargeback?month=0001-01", "month", "1970-01 and 2199-12"),
        ("/v1/reports/mix?to=9999-12-31", "to", "1970-01-01 and 2199-12-31"),
        ("/v1/reports/latency?from=0001-01-01", "from", "1970-01-01 and 2199-12-31"),
        ("/v1/reports/savings?month=9999-12", "month", "1970-01 and 2199-12"),
    ],
)
def test_extreme_dates_get_a_400_naming_the_parameter(api: RunningApi, path: str, field: str, accepted: str) -> None:
    reply = call(api.port, "GET", path, Authorization=f"Bearer {ADMIN_TOKEN}")
    assert reply.status == 400, reply.body
    (problem,) = reply.json()["problems"]
    assert problem["field"] == field and accepted in problem["message"]
    edge = path.replace("9999-12-31", "2199-12-31").replace("0001-01-07", "1970-01-07").replace("0001-01", "1970-01")
    assert (
        call(api.port, "GET", edge.replace("9999-12", "2199-12"), Authorization=f"Bearer {ADMIN_TOKEN}").status == 200
    )


def test_absurd_budget_limits_get_a_400_naming_the_field(api: RunningApi) -> None:
    for limit in (1e30, "1e30", -1, 10**30, "NaN", True):
        doc = {"month": "2026-11", "budgets": [{"scope": "team:x", "limit_usd": limit}]}
        reply = call(api.port, "POST", "/v1/admin/budgets", json.dumps(doc).encode(),
                     Content_Type="application/json", Authorization=f"Bearer {ADMIN_TOKEN}")  # fmt: skip
        assert reply.status == 400, (limit, reply.body)
        assert "budgets[0].limit_usd" in reply.json()["error"], reply.json()
    doc = {"month": "2026-11", "budgets": [{"scope": "team:x", "limit_nanos": 2**63}]}
    reply = call(api.port, "POST", "/v1/admin/budgets", json.dumps(doc).encode(),
                 Content_Type="application/json", Authorization=f"Bearer {ADMIN_TOKEN}")  # fmt: skip
    assert reply.status == 400 and "budgets[0].limit_nanos" in reply.json()["error"]


def test_the_cli_reads_only_the_api_of_its_own_data_directory(api: RunningApi, tmp_path: Path) -> None:
    # The API owns the embedded ledger: the CLI of the same data directory reads through it.
    done = cli(api.env, "report", "chargeback", "--month", "2026-11", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["params"]["month"] == "2026-11-01"
    assert f"through the API at http://127.0.0.1:{api.port}" in done.stderr
    # The API's own error reaches the user, not "the API did not answer".
    refused = cli(api.env, "report", "top", "--by", "colour")
    assert refused.returncode == 2 and f"http://127.0.0.1:{api.port} answered 400" in refused.stderr
    assert "colour" in refused.stderr
    for args in (("report", "weekly", "--as-of", "0001-01-07"), ("report", "chargeback", "--month", "0001-01")):
        bad = cli(api.env, *args)
        assert bad.returncode == 2 and "must be between 1970-01" in bad.stderr and "Traceback" not in bad.stderr

    # `spendstream sql` reads through the API as well (a user session: it told finance to stop the stack); a write
    # still needs the ledger itself, and the API's read-only rules hold
    read = cli(api.env, "sql", "SELECT count() AS n FROM usage_ledger", "--format", "json")
    assert read.returncode == 0, read.stderr
    assert "read through the API" in read.stderr and "n" in read.stdout
    write = cli(api.env, "sql", "--write", "TRUNCATE TABLE usage_ledger")
    assert write.returncode == 1 and "writes go to the ledger directly" in write.stderr
    sneaky = cli(api.env, "sql", "SELECT * FROM file('/etc/passwd')")
    assert sneaky.returncode == 1 and "answered 400" in sneaky.stderr and "Traceback" not in sneaky.stderr
    reply = call(api.port, "POST", "/v1/sql", json.dumps({"query": "SELECT 1", "timeout_s": 3600}).encode(),
                 Content_Type="application/json", Authorization=f"Bearer {ADMIN_TOKEN}")  # fmt: skip
    assert reply.status == 400 and "timeout_s" in reply.json()["error"]
    # an attacker session: a viewer's SELECT of 3 million rows grew the API's process by 1.6 GB
    huge = call(api.port, "POST", "/v1/sql", json.dumps({"query": "SELECT number FROM numbers(3000000)"}).encode(),
                Content_Type="application/json", Authorization=f"Bearer {ADMIN_TOKEN}")  # fmt: skip
    assert huge.status == 400 and "result" in huge.json()["error"].lower(), huge.body[:300]
    greedy = {"query": "SELECT 1", "max_memory_mb": 1 << 20}
    reply = call(api.port, "POST", "/v1/sql", json.dumps(greedy).encode(),
                 Content_Type="application/json", Authorization=f"Bearer {ADMIN_TOKEN}")  # fmt: skip
    assert reply.status == 400 and "max_memory_mb" in reply.json()["error"]

    # Another stack whose ledger is held by a process without an API, configured with the first API's
    # port: the CLI must not read the first stack's reports, and chDB's raw lock error never shows.
    other = tmp_path / "stack-b"
    env = base_env(other, SPENDSTREAM_API_PORT=str(api.port))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom spendstream.core.config import load_settings\n"
         "from spendstream.core.ledger_store import connect, migrate\n"
         "s = load_settings(); c = connect(s); migrate(c, s); print('held', flush=True); sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        stray = cli(env, "report", "chargeback", "--month", "2026-11")
        sql = cli(env, "sql", "SELECT 1")
    finally:
        holder.communicate("", timeout=30)
    assert stray.returncode == 1 and stray.stdout == "", stray.stdout
    assert f"no spendstream API serves {other.resolve()}" in stray.stderr
    for result in (stray, sql):
        assert "Code: 76" not in result.stderr and "Cannot lock" not in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_report_from_a_data_directory_without_a_ledger_is_an_error_not_an_empty_report(tmp_path: Path) -> None:
    """A user session: a mistyped SPENDSTREAM_DATA_DIR printed a chargeback of (no data) and exit 0."""
    typo = tmp_path / "dataa"
    for args in (("report", "chargeback"), ("sql", "SELECT 1"), ("export", "focus", "--month", "2026-11")):
        done = cli(base_env(typo), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert f"no ledger in {typo.resolve()}" in done.stderr and "SPENDSTREAM_DATA_DIR" in done.stderr
    assert not (typo / "ledger").exists()


def test_token_cli_refuses_bad_use(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    scoped_viewer = cli(env, "api", "token", "create", "--role", "viewer", "--team", "x")
    assert scoped_viewer.returncode == 2 and "ingest tokens only" in scoped_viewer.stderr
    assert cli(env, "api", "token", "create", "--role", "ingest", "--name", "a").returncode == 0
    again = cli(env, "api", "token", "create", "--role", "ingest", "--name", "a")
    assert again.returncode == 2 and "exists" in again.stderr
    typo = cli(env, "api", "token", "create", "--role", "owner")
    assert typo.returncode == 2 and "invalid choice" in typo.stderr and "Traceback" not in typo.stderr
    listed = cli(env, "api", "token", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("a\tingest\t-\t")


def test_an_unparseable_tokens_file_stops_the_api_at_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "api-tokens.yaml").write_text("tokens:\n  - name: x\n    role: superuser\n    sha256: abc\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = base_env(data_dir, SPENDSTREAM_API_PORT=str(port), SPENDSTREAM_KAFKA_BOOTSTRAP="127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "spendstream.cli", "api"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2 and "entry 0" in done.stderr and "role" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_connection_trickling_its_headers_is_closed(api: RunningApi) -> None:
    """SPENDSTREAM_API_HEADER_TIMEOUT_S is 1 s here: a client that keeps sending header lines but never ends the
    head is cut off (slowloris), while the API keeps serving others."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/reports/weekly HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(200):  # up to 20 s of trickling
            try:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.1)
            try:
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed = True
            break
        assert closed, "the API kept a connection open whose request head never ended"
    assert call(api.port, "GET", "/healthz").status == 200


def test_a_body_trickling_in_is_answered_408_once_three_header_timeouts_have_passed(api: RunningApi) -> None:
    """An attacker session: a body of 1,000 bytes sent a byte a second held its connection (and handler) for
    minutes. The header timeout is 1 s here, so the body has 3 s."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        head = (
            f"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"[")
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(1.0)
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 10
    assert call(api.port, "GET", "/healthz").status == 200


def test_a_mistyped_path_is_not_found_for_any_token_and_unauthorised_without_one(api: RunningApi) -> None:
    ingest = create_token(api.env, "--role", "ingest", "--team", "marketing")
    typo = call(api.port, "POST", "/v1/usages", json.dumps(event()).encode(), Content_Type="application/json",
                Authorization=f"Bearer {ingest}")  # fmt: skip
    assert typo.status == 404 and "POST /v1/usages" in typo.json()["error"], typo.body
    wrong_method = call(api.port, "DELETE", "/v1/usage", Authorization=f"Bearer {ingest}")
    assert wrong_method.status == 405 and "DELETE /v1/usage" in wrong_method.json()["error"], wrong_method.body
    assert call(api.port, "GET", "/v1/nothing-here").status == 401  # without a token the API's paths stay unlisted


def test_a_tokens_file_broken_by_hand_keeps_only_the_tokens_it_still_lists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An admin deletes a token's block by hand and leaves a stray line, so the file no longer parses: the deleted
    token is refused from the next request (it stayed in force with the rest on the old code), the listed ones
    still work, and the API says why in its log."""
    from spendstream.api.tokens import TokenStore, add_token

    path = tmp_path / "api-tokens.yaml"
    admin = add_token(path, "admin", "adm")
    viewer = add_token(path, "viewer", "view")
    store = TokenStore(path)
    assert store.lookup(admin) is not None and store.lookup(viewer) is not None
    head, *blocks = path.read_text().split("\n- ")
    kept = [block for block in blocks if "name: view" in block]
    path.write_text(head + "\n- " + "\n- ".join(kept) + "  - {broken\n")  # the admin's block deleted, and a typo
    with caplog.at_level("ERROR", logger="spendstream.api.tokens"):
        assert store.lookup(admin) is None
        assert store.lookup(viewer) is not None
    assert store.problem is not None and "(view)" in store.problem
    assert any("stay in force (view)" in record.getMessage() for record in caplog.records)
    path.write_text("tokens:\n#" + "\n#".join(kept) + "\n  - {broken\n")  # the viewer commented out too
    assert store.lookup(viewer) is None
    path.write_text("garbage: [")  # nothing listed any more: nothing stays in force
    assert store.lookup(viewer) is None


def test_a_team_bound_ingest_token_cannot_report_a_feature_or_project_the_policy_gives_another_team() -> None:
    from types import SimpleNamespace

    from spendstream.api.tokens import ApiToken
    from spendstream.core.policy import parse_policy

    policy = parse_policy(
        "features:\n  ai_chatbot: {critical: true, teams: [support]}\nprojects: {eng-platform: engineering}\n"
    )
    marketing = ApiToken(sha256="0" * 64, name="mkt", role="ingest", teams=("marketing",))
    event = SimpleNamespace(team="marketing", feature="ai_chatbot", project="")
    assert marketing.owner_problem(event, policy) == (
        "feature",
        "token 'mkt': feature 'ai_chatbot' belongs to team support by the policy; a call of team 'marketing' "
        "cannot name it",
    )
    # a project's spend counts toward the team the policy puts it under: an attacker session shut off
    # engineering's project budget with a marketing token
    assert marketing.owner_problem(SimpleNamespace(team="marketing", feature="", project="eng-platform"), policy) == (
        "project",
        "token 'mkt': project 'eng-platform' belongs to team 'engineering' by the policy; a call of team "
        "'marketing' cannot name it",
    )
    own = SimpleNamespace(team="marketing", feature="campaigns", project="mkt-site")
    assert marketing.owner_problem(own, policy) is None
    trusted = ApiToken(sha256="1" * 64, name="etl", role="ingest")  # bound to no team: reports for any
    assert trusted.owner_problem(event, policy) is None


def test_admin_endpoints_are_disabled_only_while_no_admin_token_exists(tmp_path: Path) -> None:
    """A viewer calling an admin endpoint was told "admin endpoints are disabled" although an admin token
    existed in the tokens file: the refusal must say which role is needed instead."""
    from spendstream.api.tokens import TokenStore, add_token

    path = tmp_path / "api-tokens.yaml"
    add_token(path, "viewer", "view")
    store = TokenStore(path)
    assert not store.any_with_role("admin")
    add_token(path, "admin", "adm")
    assert store.any_with_role("admin") and store.any_with_role("viewer") and not store.any_with_role("approver")


def test_sql_read_through_the_api_prints_plain_decimals(api: RunningApi) -> None:
    """The API runs the read for the CLI while it owns the embedded ledger: its rows read as the CLI's own do."""
    query = "SELECT toDecimal128(0, 9) / 1000000000 AS zero, toDecimal128(7, 9) / 1000000000 AS seven"
    done = cli(api.env, "sql", query)
    assert done.returncode == 0 and "read through the API" in done.stderr, done.stderr
    assert re.fullmatch(r"0\.000000000\s+0\.000000007", done.stdout.splitlines()[4]), done.stdout
