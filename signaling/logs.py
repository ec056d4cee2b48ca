"""Log hygiene: a malformed request or a client that went away is one INFO line, not an ERROR traceback."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionError)


class ClientFaultFilter(logging.Filter):
    """Rewrites aiohttp's records of errors the client caused (a malformed request, an undecodable body, a reset)
    into one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record; demote and flatten those whose exception is the client's doing."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CLIENT_FAULTS):
            detail = " ".join(str(exc).split()) or "connection closed"
            record.msg = f"{record.getMessage()}: {exc.__class__.__name__}: {detail}"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_client_faults() -> None:
    """Install :class:`ClientFaultFilter` on aiohttp's server logger."""
    logging.getLogger("aiohttp.server").addFilter(ClientFaultFilter())
