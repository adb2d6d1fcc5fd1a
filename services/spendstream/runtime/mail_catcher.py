"""The embedded stack's local mail catcher: e-mail the policy sends to a loopback SMTP port lands in files.

The reference policy mails its alerts and reports through ``127.0.0.1:1025``, the usual port of a local mail
catcher. Without one listening there, every notification of a ``dev`` run ended as a dead letter, with a warning
on the console. ``spendstream dev`` starts this one (aiosmtpd) when the port is free, and each message is saved
as an ``.eml`` file that any mail client opens.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every connection at INFO


class _SaveToFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._numbers = itertools.count(1)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{next(self._numbers):05d}.eml"
        (self.directory / name).write_bytes(envelope.original_content or envelope.content)
        return "250 saved"


class MailCatcher:
    """An SMTP server on ``host:port`` that saves every message under ``directory``."""

    def __init__(self, host: str, port: int, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._controller = Controller(_SaveToFiles(directory), hostname=host, port=port)

    def start(self) -> MailCatcher:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def messages(self) -> list[Path]:
        return sorted(self.directory.glob("*.eml"))
