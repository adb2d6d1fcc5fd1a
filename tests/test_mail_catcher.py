"""`spendstream dev`'s mail catcher: the policy's e-mail to a loopback port lands in files, not dead letters."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from spendstream.runtime.embedded_broker import free_port
from spendstream.runtime.mail_catcher import MailCatcher


def test_each_message_sent_to_the_catcher_is_saved_as_an_eml_file(tmp_path: Path) -> None:
    port = free_port()
    catcher = MailCatcher("127.0.0.1", port, tmp_path / "mail").start()
    try:
        for n in (1, 2):
            message = EmailMessage()
            message["From"], message["To"], message["Subject"] = "s@acme.example", "cfo@acme.example", f"alert {n}"
            message.set_content("team:marketing is at 85 %")
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.send_message(message)
    finally:
        catcher.stop()
    saved = catcher.messages()
    assert [BytesParser().parsebytes(p.read_bytes())["Subject"] for p in saved] == ["alert 1", "alert 2"]
    assert "85 %" in saved[0].read_text()
