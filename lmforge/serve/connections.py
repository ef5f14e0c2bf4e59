"""How uvicorn holds connections for ``lmforge serve``: a header-read timeout and a cap on connections.

uvicorn bounds the wait *between* requests on a kept-alive connection (``timeout_keep_alive``) and the number
of connections it serves (``limit_concurrency``: 503 beyond), but not the time a client may take to send a
request's headers: any byte that arrives restarts its keep-alive timer, so a client that sends a header line
every few seconds (a "slowloris") holds its connection, and its file descriptor, for as long as it likes.
``header_timeout_protocol`` subclasses the HTTP protocol uvicorn would choose itself (h11, or httptools where
installed) with one timer: from the moment a connection opens, or its previous response completes, the next
request's headers must be complete within ``header_timeout_s``, else the connection is answered 408 and
closed. Once a request's headers are in, the timer no longer applies; the body then has ``BodyLimit``'s read
timeout and the request the per-request timeout. Nginx's ``client_header_timeout`` is the same rule.

``uvicorn_settings`` is the one place where ``Limits`` become uvicorn's settings (the command and the
tests start servers from it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from lmforge.serve.limits import Limits

__all__ = ["header_timeout_protocol", "uvicorn_settings"]


def _timeout_reply(header_timeout_s: float) -> bytes:
    """A complete HTTP/1.1 408 in the API's error shape, written straight to the socket (no request exists
    yet for the app to answer)."""
    message = f"the request's headers did not arrive within {header_timeout_s:g} s"
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": 408}}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's automatic HTTP protocol class with a header-read timeout of ``header_timeout_s``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    reply = _timeout_reply(header_timeout_s)

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        """Closes a connection, with a 408, whose next request's headers are not in within the timeout."""

        _header_timer: asyncio.TimerHandle | None = None

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            answering = self.cycle is not None and not self.cycle.response_complete
            if answering or self.transport.is_closing():
                return  # the next request's headers came in time (its completion re-arms the timer)
            self.transport.write(reply)
            self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_settings(limits: Limits) -> dict[str, Any]:
    """uvicorn ``Config`` keywords that hold ``limits``' connection rules."""
    return {
        "http": header_timeout_protocol(limits.header_timeout_s),
        "limit_concurrency": limits.max_connections,  # connections and tasks at once; 503 beyond
    }
