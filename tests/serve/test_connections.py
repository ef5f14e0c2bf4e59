"""The server's connection rules under a real uvicorn: a header-read timeout (a slowloris client is answered
408 and let go) and a cap on connections (503 beyond it), from ``serve.connections.uvicorn_settings``."""

from __future__ import annotations

import asyncio
import select
import socket
from urllib.parse import urlparse

from lmforge.serve.connections import uvicorn_settings
from lmforge.serve.limits import Limits


async def _app(scope, receive, send) -> None:
    """A plain ASGI app: ``/slow`` answers after 2.5 s (longer than the tests' header timeouts), anything else
    at once."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(2.5)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _connect(url: str) -> socket.socket:
    address = urlparse(url)
    return socket.create_connection((address.hostname, address.port), timeout=30)  # a hang fails, never blocks


def _read_reply(sock: socket.socket) -> bytes:
    """Bytes until one whole reply (headers + content-length body) is in."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def _read_to_close(sock: socket.socket) -> bytes:
    """Bytes until the server closes. A reset ends the read too: a server that closes with a client's bytes
    unread resets the connection, and the client may lose what it was sent."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_client_that_sends_its_headers_a_line_at_a_time_is_let_go(server_factory) -> None:
    """Each header line restarts uvicorn's keep-alive timer; the header timeout counts from the connection's
    opening all the same, so the server closes the connection (before, it was held as long as lines came).
    What the client reads is the 408, or nothing where its last line crossed the close (a reset)."""
    _, _, url = server_factory(_app, **uvicorn_settings(Limits(header_timeout_s=0.3)))
    sock = _connect(url)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for i in range(500):  # a line every 20 ms, for 10 s and more, unless the server lets the client go
        if select.select([sock], [], [], 0.02)[0]:
            break
        try:
            sock.sendall(b"X-Slow-%d: 1\r\n" % i)
        except OSError:
            break
    else:
        raise AssertionError("the server still held the connection after 500 header lines")
    reply = _read_to_close(sock)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:80]


def test_a_request_answered_after_the_header_timeout_and_the_next_on_its_connection_are_served(
    server_factory,
) -> None:
    """The timeout covers only the wait for headers: a reply slower than it is not cut, and a kept-alive
    connection serves its next request (the timer starts again from the previous reply). The timeout (1 s) is
    far longer than a loaded machine takes to read headers sent at once, and far shorter than the reply."""
    _, _, url = server_factory(_app, **uvicorn_settings(Limits(header_timeout_s=1.0)))
    sock = _connect(url)
    for path in (b"/slow", b"/"):
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok"), reply[:80]
    sock.close()


def test_connections_beyond_the_cap_are_answered_503_until_idle_ones_time_out(server_factory) -> None:
    """Two silent connections fill a cap of three (uvicorn counts the asking one); a request is answered
    503, and once the header timeout has let the silent ones go (each with a 408 that says why), 200. The
    timeout (3 s) leaves a loaded machine ample time to answer the request before the silent ones go."""
    _, _, url = server_factory(_app, **uvicorn_settings(Limits(header_timeout_s=3.0, max_connections=3)))
    silent = [_connect(url) for _ in range(2)]
    asking = _connect(url)
    asking.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_to_close(asking).startswith(b"HTTP/1.1 503")
    for sock in silent:
        reply = _read_to_close(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b"headers did not arrive within 3 s" in reply, reply[:80]
    again = _connect(url)
    again.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_to_close(again).startswith(b"HTTP/1.1 200")
