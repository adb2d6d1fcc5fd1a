"""The documentation cannot drift from the code.

* docs/cli.md and the README's command list are generated from the argument parser; the test fails when
  they are stale (regenerate: ``python -m spendstream.cli_reference --write``).
* Every command and subcommand opens its ``--help`` with a one-line description, every option has help.
* Every fenced block in README.md and docs/ declares its language; every ``bash`` and ``python`` block is
  executed, against a ``spendstream dev --stub-upstream`` stack this test starts (the documented default
  addresses are rewritten to its ports). ``make TARGET`` lines are dry-run (``make -n``): running the test
  suite from inside itself is not the point, that the target exists and does what the line says is.
  Illustrative output is marked ``text``. Every ``sql`` statement runs through ``spendstream sql`` on a freshly
  migrated ledger, so a renamed column or view breaks the test, not the finance analyst's query.
* Relative links resolve, and no file cites a design document that is not in the repository.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from spendstream.cli import build_parser, main
from spendstream.cli_reference import (
    COMMANDS_BEGIN,
    COMMANDS_END,
    cli_reference_markdown,
    command_list_markdown,
    commands,
)
from spendstream.runtime.embedded_broker import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.S | re.M)
EXECUTED = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
NOT_EXECUTED = {"text", "sql", "yaml", "json", "console"}
REGENERATE = "run `python -m spendstream.cli_reference --write` from the repository root"


def _blocks() -> list[tuple[str, int, str, str]]:
    """(file, line, language, code) of every fenced block in the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((str(path.relative_to(ROOT)), line, match.group(1).strip(), match.group(2)))
    return found


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b[2] in EXECUTED]


COMMANDS = commands(build_parser())


# -- generated references --------------------------------------------------------------------------------------


def test_cli_reference_is_generated_from_the_parser() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference_markdown(), f"docs/cli.md is stale: {REGENERATE}"


def test_readme_lists_every_command_generated_from_the_parser() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(COMMANDS_BEGIN) + len(COMMANDS_BEGIN) : readme.index(COMMANDS_END)]
    assert block.strip() == command_list_markdown(), f"the README's command list is stale: {REGENERATE}"
    assert "[docs/cli.md](docs/cli.md)" in readme


@pytest.mark.parametrize(("path", "line", "sub"), COMMANDS, ids=[" ".join(p) for p, _, _ in COMMANDS])
def test_every_command_help_opens_with_what_it_does(
    path: tuple[str, ...], line: str, sub: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]
) -> None:
    assert line and "\n" not in line and len(line) <= 110, f"{' '.join(path)}: one line, please: {line!r}"
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.split("\n\n")[1].replace("\n", " ").startswith(line[:40]), out
    undocumented = [
        a.option_strings or a.dest for a in sub._actions if not a.help and not isinstance(a, argparse._SubParsersAction)
    ]
    assert undocumented == [], f"{' '.join(path)}: arguments without help"


# -- links and references --------------------------------------------------------------------------------------


def test_relative_links_resolve() -> None:
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_no_file_cites_a_design_document_outside_the_repository() -> None:
    found = subprocess.run(
        ["grep", "-rn", "DESIGN", "services", "infra", "schemas", "tests", "bench", "docs", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert [line for line in found if not line.startswith("tests/test_docs.py")] == []


def test_every_block_declares_its_language() -> None:
    unknown = [f"{f}:{line} {lang!r}" for f, line, lang, _ in BLOCKS if lang not in {*EXECUTED, *NOT_EXECUTED}]
    assert unknown == [], "mark shell/Python blocks bash/python (they are executed) and output `text`"


# -- the blocks, executed against a running stack --------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``spendstream dev --stub-upstream`` on free ports; yields the environment a reader's shell would have."""
    data_dir = tmp_path_factory.mktemp("docs-stack")
    ports = {"broker": free_port(), "api": free_port(), "gateway": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env.update(
        SPENDSTREAM_DATA_DIR=str(data_dir / "data"),
        SPENDSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{ports['broker']}",
        SPENDSTREAM_API_PORT=str(ports["api"]),
        SPENDSTREAM_GATEWAY_PORT=str(ports["gateway"]),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    log = (data_dir / "dev.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "dev", "--stub-upstream"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
    )
    try:
        _wait_until_up(f"http://127.0.0.1:{ports['api']}/healthz", ports["gateway"], proc, data_dir / "dev.log")
        yield {**env, "DOCS_STACK_PORTS": " ".join(f"{k}={v}" for k, v in ports.items())}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _wait_until_up(health: str, gateway_port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dev exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(health, timeout=2):
                pass
            with socket.create_connection(("127.0.0.1", gateway_port), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dev did not come up within 120s:\n{log.read_text()[-3000:]}")


def _for_this_stack(code: str, env: dict[str, str]) -> str:
    """The documented default addresses, pointed at the test's stack."""
    ports = dict(item.split("=") for item in env["DOCS_STACK_PORTS"].split())
    return (
        code.replace("127.0.0.1:9092", f"127.0.0.1:{ports['broker']}")
        .replace("127.0.0.1:8081", f"127.0.0.1:{ports['api']}")
        .replace("127.0.0.1:8080", f"127.0.0.1:{ports['gateway']}")
    )


@pytest.mark.slow
@pytest.mark.parametrize(("file", "line", "lang", "code"), RUNNABLE, ids=[f"{f}:{n}" for f, n, _, _ in RUNNABLE])
def test_documented_block_runs(
    stack: dict[str, str], tmp_path: Path, file: str, line: int, lang: str, code: str
) -> None:
    """Each block runs as a reader would paste it: in a fresh directory of a checkout, against a running stack."""
    for entry in ("infra", "schemas"):
        (tmp_path / entry).symlink_to(ROOT / entry)
    (tmp_path / ".curlrc").write_text("fail-with-body\nshow-error\n")  # an HTTP error fails the block
    code = _for_this_stack(code, stack)
    if EXECUTED[lang] == "bash":
        code = re.sub(r"^make (\w+)", rf"make -n -C {ROOT} \1", code, flags=re.M)
        argv = ["bash", "-euo", "pipefail", "-c", code]
    else:
        argv = [sys.executable, "-c", code]
    env = {**stack, "CURL_HOME": str(tmp_path)}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"{file}:{line} ({lang}) failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


SQL = [b for b in BLOCKS if b[2] == "sql"]


@pytest.mark.parametrize(("file", "line", "lang", "code"), SQL, ids=[f"{f}:{n}" for f, n, _, _ in SQL])
def test_documented_sql_runs_on_a_migrated_ledger(tmp_path: Path, file: str, line: int, lang: str, code: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env["SPENDSTREAM_DATA_DIR"] = str(tmp_path / "data")
    cli = [sys.executable, "-m", "spendstream.cli"]
    subprocess.run([*cli, "ledger", "migrate"], env=env, check=True, capture_output=True, timeout=120)
    for statement in (s.strip() for s in code.split(";")):
        if statement:
            done = subprocess.run(
                [*cli, "sql", "--format", "csv", statement], env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, f"{file}:{line}: {statement}\n{done.stderr}"


def test_the_documented_premium_share_counts_calls_by_the_model_requested_too(tmp_path: Path) -> None:
    """A call metered without a served model (an ingested event) counts by the model it asked for; a share is a
    number, not an empty cell (user session: the README's query printed nothing for a month of gpt-4o calls)."""
    (statement,) = [s.strip() for _, _, _, code in SQL for s in code.split(";") if "premium_share" in s]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_")}
    env["SPENDSTREAM_DATA_DIR"] = str(tmp_path / "data")
    cli = [sys.executable, "-m", "spendstream.cli"]
    subprocess.run([*cli, "ledger", "migrate"], env=env, check=True, capture_output=True, timeout=120)
    seed = (
        "INSERT INTO spendstream.usage_ledger (event_id, occurred_at, team, provider, model_requested, model_served, "
        "cost_nanos, status) VALUES (generateUUIDv4(), now(), 'web', 'openai', 'gpt-4o', '', 3000, 'ok'), "
        "(generateUUIDv4(), now(), 'web', 'openai', 'gpt-4o-mini', 'gpt-4o-mini', 1000, 'ok'), "
        "(generateUUIDv4(), now(), 'web', 'openai', 'gpt-4o', 'gpt-4o', NULL, 'blocked')"
    )
    subprocess.run([*cli, "sql", "--write", seed], env=env, check=True, capture_output=True, timeout=120)
    done = subprocess.run(
        [*cli, "sql", "--format", "csv", statement], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[1:] == ["web,0.75"], done.stdout
