"""One embedded stack per data directory.

A second ``spendstream dev`` on the same directory would write the first one's API tokens and gateway keys and
open the same embedded ledger; the first then answers with credentials nobody holds any more. An advisory lock
(``flock``) on a file in the directory is taken before anything is written, and released by the kernel when the
process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "stack.lock"


class DataDirInUse(RuntimeError):
    pass


@contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this process, or raise ``DataDirInUse`` naming the process that holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DataDirInUse(
                f"another spendstream stack (pid {holder}) runs on the data directory {data_dir}; stop it first, "
                "or give this one its own SPENDSTREAM_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
