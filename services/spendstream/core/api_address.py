"""The address file a running API leaves in its data directory, so the CLI of that directory finds it.

``DATA_DIR/api.json`` (mode 0600) holds the API's URL, its process id and a viewer token made for
this process only: whoever can read the data directory can read the ledger files anyway, so the
token gives nothing new, and the CLI (and a processor rebuilding its windows from an embedded ledger)
never guesses a port or reads another stack's API.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ApiAddress:
    url: str
    pid: int
    read_token: str


def write_address(path: Path, address: ApiAddress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"url": address.url, "pid": address.pid, "read_token": address.read_token}, out)
    os.replace(tmp, path)


def remove_address(path: Path, pid: int) -> None:
    """Remove the file if this process wrote it (a newer API may have replaced it)."""
    found = read_address(path)
    if found is not None and found.pid == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def read_address(path: Path) -> ApiAddress | None:
    """The API serving this data directory, or None if none runs (no file, or its process is gone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        address = ApiAddress(str(data["url"]), int(data["pid"]), str(data["read_token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(address.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return address
