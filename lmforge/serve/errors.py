"""Errors answered as JSON in OpenAI's shape (``APIError``, ``error_response``), and ``BodyLimit``: the ASGI
middleware that counts a request body's bytes as they arrive and answers 413 past the limit (a chunked upload
without Content-Length is cut there, never buffered whole). Hand-written, not FastAPI's ``max_body_size``,
which answers plain text."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered as JSON: status, message, the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # a message may quote the request: lone surrogates in it would make the JSON body itself unencodable
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


BODY_CUT = "lmforge.body_cut"


class _BodyCut(Exception):
    """Raised into the app when its request body passed the limit (after the 413 was sent)."""


class BodyLimit:
    """ASGI middleware: the request body's bytes are counted as they arrive, and reading stops at the limit.

    A declared Content-Length over the limit is answered 413 before the app runs; a body whose next piece does
    not come within ``read_timeout_s`` is answered 408. A body without one
    (chunked) is counted message by message: the message that passes the limit makes this middleware
    send the 413 itself and raise ``_BodyCut`` into the app's read; whatever the app then sends is
    dropped and the exception is swallowed here. At most the limit plus one message is ever held.
    Written here rather than FastAPI's ``max_body_size`` (0.16x), which answers a declared oversize
    body in plain text, outside the app's JSON error shape.
    """

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 10.0) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body exceeds {self.max_bytes} bytes", param="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        received, started, answered = 0, False, False

        async def guarded_send(message) -> None:
            nonlocal started
            if answered:  # the 413 went out: the app's own answer to the cut body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def counted_receive():
            nonlocal received, answered
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:  # a body promised and not sent: answer and let the connection go
                if not started:
                    message = f"no more of the request body within {self.read_timeout_s:g} s"
                    await error_response(408, message, param="body")(scope, receive, send)
                    answered = True
                raise _BodyCut from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        await self._too_large()(scope, receive, send)
                        answered = True
                        scope[BODY_CUT] = True  # what the client got, for the request metrics
                    raise _BodyCut
            return message

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not answered:
                raise


# --- request shapes -------------------------------------------------------------------------------------
