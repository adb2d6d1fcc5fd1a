"""API tokens: who may post usage, read reports and the dashboard, or administer the ledger.

A tokens file (``SPENDSTREAM_API_TOKENS_FILE``, default ``DATA_DIR/api-tokens.yaml``) lists entries
such as::

    - sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      name: marketing-ingest
      role: ingest          # viewer | ingest | approver | admin
      teams: [marketing]    # ingest only: the orgs, teams, projects, features, customers, environments
                            # and providers it may report for (each empty: any)
    - sha256: ...
      name: dana
      role: approver        # reads like a viewer, and approves budget requests
      level: director       # approver only: a level of the policy's ``approvals.levels``

A token's name is its principal: who requested, approved or denied a budget change is the name of the token
that made the request, never a field of the request.

Only sha256 hashes are stored, as for the gateway's virtual keys; ``spendstream api token create``
prints a token once. A running API re-reads the file when it changes, so a new or revoked token
takes effect at the next request.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spendstream.core.config import ConfigError
from spendstream.gateway.keys import hash_key, uncommented

if TYPE_CHECKING:
    from spendstream.core.policy import Policy

log = logging.getLogger(__name__)
Role = Literal["viewer", "ingest", "approver", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "ingest", "approver", "admin")
TOKEN_PREFIX = "ss-api-"
# Event fields an ingest token can be limited to. A team token that could name any feature or customer
# could exhaust another team's feature or customer budget, so each has its own allowlist.
SCOPE_FIELDS = ("org", "team", "project", "feature", "customer", "environment", "provider")


CALLER = "spendstream.caller"  # the request key under which the API's guard leaves the authenticated ApiToken


class ApiToken(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the token; the token is never stored.")
    name: str = Field(min_length=1)
    role: Role
    orgs: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    projects: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    customers: tuple[str, ...] = ()
    environments: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    level: str = ""  # approver only: its approval level (``approvals.levels`` of the policy)
    created_at: str = ""

    def allows(self, needed: Role) -> bool:
        return self.role == "admin" or self.role == needed or (self.role == "approver" and needed == "viewer")

    def scope_problem(self, event: Any) -> tuple[str, str] | None:
        """(field, message) if ``event`` reports for a value of a ``SCOPE_FIELDS`` field outside this token's scope."""
        for field in SCOPE_FIELDS:
            allowed = getattr(self, field + "s")
            value = getattr(event, field)
            if allowed and value not in allowed:
                return field, f"token {self.name!r} may report for {field} {', '.join(allowed)} only, not {value!r}"
        if self.teams and event.division:
            # An event's division replaces its team's division from the policy: naming one would charge
            # another department's budgets with this token's teams' spend.
            return "division", (
                f"token {self.name!r} reports for team {', '.join(self.teams)}, whose division the policy gives; "
                f"leave division out (got {event.division!r})"
            )
        return None

    def owner_problem(self, event: Any, policy: Policy | None) -> tuple[str, str] | None:
        """(field, message) if a team-bound token reports a feature or a project the policy gives other teams: it
        would spend that feature's or project's budgets (a project's count toward its team's too), and a critical
        feature would be throttled instead of stopped past its team's."""
        owned = policy.owner_problem(event.team, event.feature, event.project) if self.teams and policy else None
        return None if owned is None else (owned[0], f"token {self.name!r}: {owned[1]}")

    def org_problem(self, event: Any, policy_org: str) -> tuple[str, str] | None:
        """(field, message) if a team-bound token (not bound to orgs) reports an org other than the policy's: the
        event's org is counted instead, so it would step out of the org's budgets and hard caps."""
        if self.teams and not self.orgs and policy_org and event.org and event.org != policy_org:
            return "org", (
                f"token {self.name!r} reports for team {', '.join(self.teams)} of the policy's org {policy_org!r}; "
                f"leave org out or name that one (got {event.org!r})"
            )
        return None


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_tokens(text: str, path: Path) -> dict[str, ApiToken]:
    """The entries of a tokens file by hash; ``ConfigError`` naming the entry and field otherwise."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"tokens file {path}: not valid YAML/JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("tokens")
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ConfigError(f"tokens file {path}: expected a list of tokens (or a mapping with 'tokens')")
    by_hash: dict[str, ApiToken] = {}
    for i, entry in enumerate(data):
        try:
            token = ApiToken.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"tokens file {path}: entry {i}: {problems}") from None
        if token.sha256 in by_hash:
            raise ConfigError(f"tokens file {path}: token {token.name!r} is listed twice")
        by_hash[token.sha256] = token
    return by_hash


class TokenStore:
    """The tokens of a file, re-read whenever the file changes (a ``stat`` at each lookup, so a revoked token is
    refused from the next request).

    A file that stops parsing keeps in force only the tokens of the last good set whose hash it still holds, so a
    token deleted in the same edit as a typo is revoked all the same (and the API logs the problem, also kept in
    ``problem``); a missing file means no tokens.
    """

    CHECK_INTERVAL_S = 0.0

    def __init__(self, path: Path, extra: Iterable[ApiToken] = ()) -> None:
        self.path = path
        self.extra = {t.sha256: t for t in extra}
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._tokens: dict[str, ApiToken] = {}
        self._refresh(force=True)
        if self.problem is not None:
            raise ConfigError(self.problem)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.CHECK_INTERVAL_S:
            return
        self._checked = now
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._tokens, self.problem = None, {}, None
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        text = ""
        try:
            text = self.path.read_text(encoding="utf-8")
            self._tokens = parse_tokens(text, self.path)
            self.problem = None
        except (ConfigError, OSError, UnicodeDecodeError) as exc:
            listed = uncommented(text)
            self._tokens = {digest: token for digest, token in self._tokens.items() if digest in listed}
            kept = ", ".join(sorted(token.name for token in self._tokens.values())) or "none"
            self.problem = f"{exc}; of the previous tokens, those the file still lists stay in force ({kept})"
            log.error("%s", self.problem)
        self._stamp = stamp

    def any_with_role(self, role: Role) -> bool:
        """Whether some token in force has ``role`` (so endpoints that need it are not "disabled")."""
        with self._lock:
            self._refresh()
            return any(token.role == role for token in (*self.extra.values(), *self._tokens.values()))

    def lookup(self, presented: str) -> ApiToken | None:
        digest = hash_key(presented)
        with self._lock:
            self._refresh()
            token = self.extra.get(digest) or self._tokens.get(digest)
            if token is None:  # a token created a moment ago works at once: look at the file now
                self._refresh(force=True)
                token = self._tokens.get(digest)
        if token is None or not hmac.compare_digest(token.sha256, digest):
            return None
        return token


def add_token(
    path: Path,
    role: Role,
    name: str,
    *,
    level: str = "",
    replace: bool = False,
    **scope: Iterable[str],
) -> str:
    """Create a token, add its hash to the tokens file (atomically, mode 0600) and return the token.

    ``scope`` maps plural field names (``teams``, ``features``, ...) to the values the token may report for.

    A name already in the file is refused unless ``replace`` (which revokes the old token).
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    current = list(parse_tokens(text, path).values())
    if any(t.name == name for t in current) and not replace:
        raise ConfigError(f"tokens file {path}: a token named {name!r} exists; choose another --name")
    token = new_token()
    unknown = sorted(set(scope) - {f + "s" for f in SCOPE_FIELDS})
    if unknown:
        raise ConfigError(f"a token cannot be limited by {', '.join(unknown)}")
    entry = ApiToken(
        sha256=hash_key(token), name=name, role=role, level=level,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        **{field: tuple(values) for field, values in scope.items()},
    )  # fmt: skip
    kept = [t for t in current if t.name != name] + [entry]
    write_tokens(path, kept)
    return token


def remove_token(path: Path, name: str) -> bool:
    """Revoke the token called ``name``; False if there is none."""
    if not path.exists():
        return False
    current = list(parse_tokens(path.read_text(encoding="utf-8"), path).values())
    kept = [t for t in current if t.name != name]
    if len(kept) == len(current):
        return False
    write_tokens(path, kept)
    return True


def write_tokens(path: Path, tokens: list[ApiToken]) -> None:
    entries = [t.model_dump(mode="json", exclude_defaults=True) | {"role": t.role} for t in tokens]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yaml.safe_dump({"tokens": entries}, out, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def new_read_token() -> str:
    """A viewer token for this API process only, written to ``DATA_DIR/api.json`` (``core.api_address``)."""
    return TOKEN_PREFIX + "local-" + secrets.token_urlsafe(32)
