"""The server's limits hold for every request: a chunked body is cut at the byte limit as it arrives, lone
surrogates are a 422 naming the field, streams take a queue slot (503 when full) and are cut at the
timeout, and a seeded sampled reply does not depend on what it is batched with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from lmforge.serve.app import Limits, create_app

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "我爱北京"}], "max_tokens": 8}


def test_a_chunked_body_over_the_limit_is_413(make_app) -> None:
    def chunks():
        for _ in range(80):  # 5 MB, no Content-Length: sent with Transfer-Encoding: chunked
            yield b" " * 65536

    with TestClient(make_app(max_body_bytes=1_000_000)) as client:
        r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["param"] == "body" and "1000000 bytes" in r.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert 'lmforge_requests_total{endpoint="/v1/classify",status="413"} 1.0' in metrics
        ok = client.post(
            "/v1/classify",
            content=iter([b'{"model": "classify", ', b'"input": ["\xe5\xa5\xbd"]}']),
            headers={"content-type": "application/json"},
        )
        assert ok.status_code == 200, ok.text  # a chunked body under the limit is read as usual


def test_a_live_server_stops_reading_a_huge_chunked_upload_at_the_limit(served, server_factory) -> None:
    """Bytes sent before the server answers 413 and closes: about the limit, not the 300 MB offered."""
    _, _, url = server_factory(create_app(served, Limits(max_body_bytes=1_000_000)))
    host, port = url.removeprefix("http://").split(":")
    sent, chunk = 0, b"1000\r\n" + b" " * 4096 + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.settimeout(0.0)
        reply = b""
        while sent < 300_000_000 and b"\r\n\r\n" not in reply:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:  # the server is not reading (any more): wait for its answer
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
            with contextlib.suppress(BlockingIOError):
                reply += sock.recv(65536)
        sock.settimeout(30)
        try:
            while b"\r\n\r\n" not in reply and (data := sock.recv(65536)):
                reply += data
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 30_000_000, f"{sent:,} bytes were taken before the answer"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/classify", '{"model": "classify", "input": ["\\ud800abc"]}', "input.0"),
        ("/v1/ner", '{"model": "ner", "input": "ab\\udfff"}', "input"),
        ("/v1/embeddings", '{"model": "embed", "input": ["ok", "\\udc00"]}', "input.1"),
        (
            "/v1/chat/completions",
            '{"model": "chat", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            "messages.0.content",
        ),
    ],
)
def test_lone_surrogates_are_a_422_naming_the_field(make_app, path: str, body: str, param: str) -> None:
    with TestClient(make_app()) as client:
        r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"].startswith(param) and "lone surrogate" in error["message"]
        paired = client.post(
            "/v1/classify",
            content='{"model": "classify", "input": ["\\ud83d\\ude00好"]}'.encode(),
            headers={"content-type": "application/json"},
        )
        assert paired.status_code == 200  # a proper surrogate pair is an emoji, which is fine


def _slow_stream(served, monkeypatch, seconds: float):
    real = served["chat"].stream

    def slow(prompt, cfg):
        for piece in real(prompt, cfg):
            time.sleep(seconds)
            yield piece

    monkeypatch.setattr(served["chat"], "stream", slow)


def test_streams_take_a_queue_slot_and_get_503_when_the_queue_is_full(make_app, served, monkeypatch) -> None:
    """Six streams at once with a queue of one: one decodes, at most one waits, the rest get 503. The decoding
    is held until four 503s have come back, so the outcome does not depend on how fast anything runs."""
    gate = threading.Event()
    real = served["chat"].stream

    def held(prompt, cfg):
        assert gate.wait(timeout=60), "the 503s never came"
        yield from real(prompt, cfg)

    monkeypatch.setattr(served["chat"], "stream", held)
    app = make_app(queue_size=1)

    async def six_streams() -> list[tuple[int, list[str]]]:
        refused = 0
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

            async def one():
                nonlocal refused
                async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                if r.status_code == 503:
                    refused += 1
                    if refused == 4:
                        gate.set()
                return r.status_code, lines

            return await asyncio.gather(*(one() for _ in range(6)))

    with TestClient(app):
        results = asyncio.run(six_streams())
    codes = sorted(code for code, _ in results)
    assert set(codes) <= {200, 503} and codes.count(200) in (1, 2) and codes.count(503) >= 4, codes
    for code, lines in results:
        if code == 200:
            assert lines[-1] == "data: [DONE]"
        else:
            assert lines == []  # a 503 is a JSON error, not a stream


def test_a_stuck_stream_is_cut_at_the_timeout(make_app, served, monkeypatch) -> None:
    _slow_stream(served, monkeypatch, 1.0)
    with (
        TestClient(make_app(timeout_s=0.3)) as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    last = json.loads(lines[-1].removeprefix("data: "))
    assert last["error"]["type"] == "timeout_error" and "data: [DONE]" not in lines


def test_a_seeded_reply_is_the_same_whatever_it_is_batched_with(make_app) -> None:
    seeded = {**CHAT, "temperature": 1.0, "seed": 1234, "max_tokens": 12}
    others = [
        {**seeded, "messages": [{"role": "user", "content": text}]} for text in ("你好", "今天天气", "北京", "谢谢")
    ]
    app = make_app(max_wait_ms=50)

    async def alone_then_together():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            alone = await c.post("/v1/chat/completions", json=seeded)
            together = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in [*others, seeded]))
            return alone, together

    with TestClient(app):  # the lifespan; the requests go through one event loop
        alone, replies = asyncio.run(alone_then_together())
    assert all(r.status_code == 200 for r in [alone, *replies]), [r.text for r in replies]
    assert replies[-1].json()["choices"][0]["message"]["content"] == alone.json()["choices"][0]["message"]["content"]


def test_the_server_answers_while_a_stream_is_cut(make_app, served, monkeypatch) -> None:
    """A stream withdrawn by its deadline leaves the model's queue usable for the next request."""
    _slow_stream(served, monkeypatch, 0.5)
    with TestClient(make_app(timeout_s=0.2)) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            list(r.iter_lines())
        r = client.post("/v1/classify", json={"model": "classify", "input": ["好"]})
        assert r.status_code == 200


def test_a_body_that_stops_coming_is_answered_408_within_the_read_timeout(make_app) -> None:
    """A client that declares 500 bytes and sends 33 gets a 408 after body_timeout_s, instead of holding its
    connection for ever (the read is bounded; the model is never called)."""
    app = make_app(body_timeout_s=0.3)
    sent: list[dict] = []
    pieces = [{"type": "http.request", "body": b'{"model": "classify", "input": ["', "more_body": True}]

    async def receive() -> dict:
        if pieces:
            return pieces.pop(0)
        await asyncio.sleep(3600)  # the rest never comes
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"500")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "root_path": "",
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 408 and b"no more of the request body within 0.3 s" in body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queue_size", 0),
        ("max_body_bytes", -1),
        ("max_connections", 0),
        ("timeout_s", 0.0),
        ("body_timeout_s", -1.0),
        ("header_timeout_s", float("nan")),
    ],
)
def test_limits_that_would_break_the_server_are_refused(field: str, value) -> None:
    from lmforge.errors import UserError
    from lmforge.serve.limits import Limits

    with pytest.raises(UserError, match=field.replace("_", "-")):
        Limits(**{field: value})
