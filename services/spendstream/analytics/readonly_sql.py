"""What "read-only" means for ``spendstream sql``: the engine's ``readonly=1`` plus ClickHouse's own parser.

``readonly=1`` refuses writes, ``SET``, most ``SETTINGS`` changes and most table functions inside a
``SELECT``; it does not stop a ``SETTINGS`` clause in a subquery, ``INTO OUTFILE`` (written by the
embedded client), ``DESCRIBE`` of a table function (which reads a file or fetches a URL to infer its
schema), the scalar ``file()``, or the statements before the last of several (chDB runs each). So a
statement is first parsed by the engine (``formatQuery`` and ``EXPLAIN AST``, which execute nothing)
and the tree is checked: one reading statement, no ``INTO OUTFILE``, no ``SETTINGS`` clause, no table
function outside a few generators, in any position (subqueries, ``WITH``, ``UNION``, ``EXPLAIN``,
``DESCRIBE``). Tree lines that an alias with a line break can forge only add nodes, so they can make
the check refuse, never accept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from spendstream.analytics.report_model import Column, Report
from spendstream.core.config import Settings

READ_ONLY_SETTINGS = {"readonly": 1}
# What one read through the API may take: the embedded ledger's other users (its sink too) wait while it runs,
# and its result is held whole in the API's process (an attacker session grew it by 1.6 GB with one SELECT).
SQL_API_TIMEOUT_S = 30
SQL_API_MAX_MEMORY_MB = 2048
SQL_API_MAX_ROWS = 100_000
READING_STATEMENTS = ("SelectWithUnionQuery", "SelectIntersectExceptQuery", "DescribeQuery", "Explain")
# Table functions that read nothing but their arguments (the engine's list gives every other name).
GENERATOR_TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generateseries", "generate_series", "primes", "values",
     "format", "view"}
)  # fmt: skip


class WriteRefused(ValueError):
    """A statement that could change data or reach outside the ledger, run without ``--write``."""


@dataclass(frozen=True)
class AstNode:
    depth: int
    kind: str
    name: str


def ast_nodes(lines: list[str]) -> list[AstNode]:
    """The nodes of an ``EXPLAIN AST`` answer: one per line, depth = leading spaces."""
    nodes = []
    for line in lines:
        words = line.strip().split()
        if words:
            nodes.append(AstNode(len(line) - len(line.lstrip(" ")), words[0], words[1] if len(words) > 1 else ""))
    return nodes


def read_only_problem(nodes: list[AstNode], table_functions: frozenset[str]) -> str | None:
    """Why the parsed statement is not a pure read of the ledger, or None.

    ``table_functions`` are the engine's table function names, lower-cased.
    """
    if not nodes:
        return "empty statement"
    root = nodes[0]
    statement = root.kind
    if root.kind == "Explain":
        explained = [n for n in nodes if n.depth == 1 and n.kind not in ("Literal", "Identifier", "Set")]
        statement = explained[0].kind if explained else "nothing"
    if not (statement in READING_STATEMENTS or statement.startswith(("Show", "Exists"))):
        kind = statement.removesuffix("Query").upper()
        return f"{kind} statement refused: only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN of those"
    if any(n.depth == 1 and n.kind == "Literal" for n in nodes):
        return "INTO OUTFILE refused: the result is printed, never written to a file"
    if any(n.kind == "Set" for n in nodes):
        return "SETTINGS refused: a read-only query runs with the ledger's settings"
    for node in nodes:
        name = node.name.lower()
        if node.kind == "Function" and name in table_functions and name not in GENERATOR_TABLE_FUNCTIONS:
            return f"{node.name}() refused: no file, URL, process or remote table functions in read-only mode"
    return None


def read_only_statement(client: Any, query: str) -> str:
    """The engine's canonical text of ``query`` if it is one pure read, else ``WriteRefused``.

    ``formatQuery`` parses the text as data (nothing runs; a second statement is an error), so the
    ``EXPLAIN AST`` that follows, and the run itself, see exactly one statement without comments.
    """
    try:
        (canonical,) = client.query(
            "SELECT formatQuery({query:String})", parameters={"query": query}, settings=READ_ONLY_SETTINGS
        ).result_rows[0]
        parsed = client.query(f"EXPLAIN AST {canonical}").result_rows  # no client settings: each Set is the query's
    except Exception as exc:  # the engine's syntax error is the useful part
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WriteRefused(f"not one statement ClickHouse can parse: {message}") from None
    names = client.query("SELECT name FROM system.table_functions", settings=READ_ONLY_SETTINGS).result_rows
    problem = read_only_problem(ast_nodes([row[0] for row in parsed]), frozenset(n.lower() for (n,) in names))
    if problem is not None:
        raise WriteRefused(f"{problem} (read-only unless --write)")
    return str(canonical)


def sql_report(
    client: Any,
    settings: Settings,
    query: str,
    write: bool = False,
    timeout_s: int = 60,
    max_memory_mb: int = 4096,
    max_rows: int | None = None,
) -> Report:
    """Run one statement; read-only unless ``write``, and cancelled by the engine after ``timeout_s`` or past
    ``max_memory_mb``.

    Two locks from the engine itself: ClickHouse's parser must see one pure read (``read_only_statement``),
    and that statement runs with ``readonly=1`` (no writes, no settings changes). The time limit keeps one
    careless query from holding the embedded ledger (and the sink waiting on it) for good; the engine checks it
    between blocks of rows, so one block of costly rows runs past it. ``max_rows`` bounds the result (an error
    past it, not a cut result).
    """
    client.database = settings.clickhouse_database  # unqualified table names mean the ledger's tables
    statement = query if write else read_only_statement(client, query)
    limits: dict[str, Any] = {"max_execution_time": timeout_s, "max_memory_usage": max_memory_mb << 20}
    if max_rows is not None:
        limits |= {"max_result_rows": max_rows, "result_overflow_mode": "throw"}
    result = client.query(statement, settings=limits if write else {**limits, **READ_ONLY_SETTINGS})
    columns = [Column(name, name) for name in result.column_names]
    rows = [{c.key: _cell(v) for c, v in zip(columns, row, strict=True)} for row in result.result_rows]
    return Report("sql", query, columns, rows)


def _cell(value: Any) -> Any:
    """A value as the table, CSV and JSON show it: numbers in plain decimals, as a spreadsheet or a finance analyst
    reads them (``0.000000007``, not ``7E-9`` as ``str`` writes the Decimal of ``toDecimal128(x, 9) / 1000000000``)."""
    if isinstance(value, int | str | date | type(None)):
        return value
    if isinstance(value, Decimal) and value.is_finite():
        return format(value, "f")
    if isinstance(value, float) and math.isfinite(value) and (value == 0 or 1e-18 <= abs(value) < 1e16):
        return format(Decimal(repr(value)), "f")  # the shortest digits that read back as the float, positional
    return str(value)
