"""One line, not a traceback, when a client's request body cannot be read after its answer was sent.

aiohttp reads what is left of a request body after the handler has answered (for example a 401 to a caller
with no token), so that the connection can be kept. A body that is truncated, or that does not inflate as its
``Content-Encoding`` says, then raises there, and aiohttp logs it as an ``Unhandled exception`` with a
20-line traceback. It is the client's error and the client already has its answer: anyone able to reach the
port could otherwise fill the console with tracebacks and bury the warnings that matter.
"""

from __future__ import annotations

import logging

from aiohttp.web_protocol import RequestPayloadError

log = logging.getLogger("spendstream.http")


class _ClientBodyErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestPayloadError):
            log.info("a client's request body could not be read after its answer: %s", str(error).replace("\n", " "))
            return False
        return True


_FILTER = _ClientBodyErrors()


def quiet_client_body_errors() -> None:
    """Install the filter on aiohttp's server log (idempotent)."""
    logging.getLogger("aiohttp.server").addFilter(_FILTER)
