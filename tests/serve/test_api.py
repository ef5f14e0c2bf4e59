"""`lmforge serve`: every endpoint, the streaming format, each error status, the API key, micro-batching,
overload, and OpenAI's own client against a live server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lmforge.cli import main
from lmforge.commands.serve import parse_models
from lmforge.inference.generate import GenerationConfig

CPU = "cpu"


def test_models_health_and_schema(make_app) -> None:
    with TestClient(make_app()) as client:
        models = client.get("/v1/models").json()
        assert {m["id"]: m["task"] for m in models["data"]} == {
            "classify": "classify",
            "ner": "ner",
            "translate": "translate",
            "embed": "embed",
            "chat": "chat",
        }
        assert client.get("/healthz").json() == {"status": "ok", "models": 5}
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/v1/classify", "/v1/ner", "/v1/translate", "/v1/embeddings", "/v1/chat/completions"):
            assert path in paths
        page = client.get("/")
        assert page.status_code == 200 and "<title>lmforge</title>" in page.text
        assert client.get("/app.js").status_code == 200


def test_classify_texts_and_pairs_equal_the_task_predictions(make_app, served) -> None:
    texts = ["这家酒店很干净，服务也好", "太差了，再也不来"]
    with TestClient(make_app()) as client:
        r = client.post("/v1/classify", json={"model": "classify", "input": texts})
        pairs = client.post("/v1/classify", json={"model": "classify", "input": [["房间不错", "早餐一般"]]})
    assert r.status_code == 200 and pairs.status_code == 200
    data = r.json()["data"]
    direct = served["classify"].task.predict(served["classify"].model, [{"text": t} for t in texts], device=CPU)
    for got, want in zip(data, direct, strict=True):
        assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert sum(got["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert pairs.json()["data"][0]["label"] in pairs.json()["data"][0]["scores"]


def test_ner_entities_are_character_spans_of_the_text(make_app, served) -> None:
    text = "国务院总理李鹏今天在北京会见了日本客人。"
    with TestClient(make_app()) as client:
        r = client.post("/v1/ner", json={"model": "ner", "input": [text]})
    assert r.status_code == 200
    entities = r.json()["data"][0]["entities"]
    assert entities == served["ner"].ner([{"text": text}])[0]["entities"]
    for e in entities:
        assert set(e) == {"type", "start", "end", "text", "score"} and text[e["start"] : e["end"]] == e["text"]


def test_translate_equals_the_task_decoding(make_app, served) -> None:
    texts = ["我爱你。", "他是学生。"]
    with TestClient(make_app()) as client:
        r = client.post("/v1/translate", json={"model": "translate", "input": texts, "num_beams": 1})
    assert r.status_code == 200
    m = served["translate"]
    want = m.task.translate(m.model, texts, device=CPU, generation=GenerationConfig(max_new_tokens=24))
    assert [d["translation"] for d in r.json()["data"]] == want


def test_embeddings_in_openai_shape_equal_the_vectors(make_app, served) -> None:
    with TestClient(make_app()) as client:
        r = client.post("/v1/embeddings", json={"model": "embed", "input": ["你好", "今天天气不错"]})
        single = client.post("/v1/embeddings", json={"model": "embed", "input": "你好"})
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    got = np.array([d["embedding"] for d in body["data"]])
    want = served["embed"].task.vectors(served["embed"].model, ["你好", "今天天气不错"], device=CPU)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(single.json()["data"][0]["embedding"], got[0], atol=1e-6)


def _chat(client, **extra):
    body = {"model": "chat", "messages": [{"role": "user", "content": "我爱北京"}], "temperature": 0, "max_tokens": 12}
    return client.post("/v1/chat/completions", json={**body, **extra})


def test_chat_completion_and_its_stream_give_the_same_greedy_reply(make_app, served) -> None:
    with TestClient(make_app()) as client:
        whole = _chat(client)
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "chat",
                "messages": [{"role": "user", "content": "我爱北京"}],
                "temperature": 0,
                "max_tokens": 12,
                "stream": True,
            },
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    body = whole.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    m = served["chat"]
    prompt = m.chat_prompt([{"role": "user", "content": "我爱北京"}], 12)
    (direct,) = m.complete([prompt], GenerationConfig(max_new_tokens=12))
    assert body["choices"][0]["message"]["content"] == direct.text.strip()
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(direct.token_ids),
        "total_tokens": len(prompt) + len(direct.token_ids),
    }
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"][0]["delta"] == {}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == direct.text.strip()


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/classify", {"model": "nope", "input": ["x"]}, 404, "model"),
        ("/v1/classify", {"model": "ner", "input": ["x"]}, 400, "model"),
        ("/v1/classify", {"model": "classify", "input": ["ok", "长" * 101]}, 413, "input[1]"),
        ("/v1/classify", {"model": "classify", "input": ["a"] * 9}, 413, "input"),
        ("/v1/classify", {"model": "classify", "input": []}, 422, "input"),
        ("/v1/classify", {"model": "classify", "input": [["a", "b", "c"]]}, 422, "input[0]"),
        ("/v1/classify", {"input": ["x"]}, 422, "model"),
        ("/v1/ner", {"model": "ner", "input": [["a", "b"]]}, 422, "input[0]"),
        ("/v1/translate", {"model": "translate", "input": ["x"], "max_tokens": 999}, 422, "max_tokens"),
        (
            "/v1/chat/completions",
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999},
            422,
            "max_tokens",
        ),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 2}, 422, "n"),
        ("/v1/explain", {"model": "translate", "input": "x", "method": "occlusion"}, 422, "method"),
        ("/v1/explain", {"model": "nope", "input": "x"}, 404, "model"),
        ("/v1/explain", {"model": "classify", "input": "x", "steps": 65}, 422, "steps"),
        ("/v1/explain", {"model": "classify", "input": "x", "method": "shap"}, 422, "method"),
        ("/v1/explain", {"model": "ner", "input": "x", "label": "PER"}, 422, "label"),
        ("/v1/explain", {"model": "embed", "input": "x"}, 422, "input"),
        ("/v1/explain", {"model": "classify", "input": "长" * 101}, 413, "input[0]"),
        (
            "/v1/chat/completions",
            {"model": "chat", "messages": [{"role": "robot", "content": "x"}]},
            422,
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"model": "chat", "messages": [{"role": "user", "content": "长" * 101}]},
            413,
            "messages.0.content",
        ),
    ],
)
def test_errors_are_json_naming_the_field(make_app, path: str, body: dict, status: int, param: str) -> None:
    with TestClient(make_app(max_text_chars=100, max_inputs=8, max_tokens=64)) as client:
        r = client.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == status and error["message"]
        assert client.get("/healthz").status_code == 200  # the server goes on


def test_explain_gives_the_attributions_of_the_command(make_app, served) -> None:
    """/v1/explain answers what tasks/explain.py computes: per token its characters and score; IG's completeness
    gap is reported; NER explains each predicted entity; an embedding model the similarity of a pair."""
    from lmforge.explain.targets import explain

    text = "这家酒店很干净，服务也好"
    with TestClient(make_app()) as client:
        r = client.post("/v1/explain", json={"model": "classify", "input": text, "steps": 16})
        ner = client.post(
            "/v1/explain", json={"model": "ner", "input": "国务院总理李鹏今天在北京", "method": "occlusion"}
        )
        pair = client.post(
            "/v1/explain", json={"model": "embed", "input": ["房间干净", "房间很干净"], "method": "attention"}
        )
    assert r.status_code == 200 and ner.status_code == 200 and pair.status_code == 200, (r.text, ner.text, pair.text)
    (got,) = r.json()["data"]
    m = served["classify"]
    (want,) = explain(m.run, {"text": text}, method="ig", steps=16)
    assert got["target"] == want.target and got["delta"] == pytest.approx(want.delta, abs=1e-6)
    assert [(t["start"], t["end"]) for t in got["tokens"]] == [(t.start, t.end) for t in want.tokens]
    assert [t["score"] for t in got["tokens"]] == pytest.approx([t.score for t in want.tokens], abs=1e-6)
    assert all(text[t["start"] : t["end"]] == t["token"] for t in got["tokens"])
    for e in ner.json()["data"]:
        assert [t["token"] for t in e["tokens"]] == list("国务院总理李鹏今天在北京")
    assert [e["text"] for e in pair.json()["data"]] == ["房间干净", "房间很干净"]
    with TestClient(make_app()) as client:
        mt = client.post("/v1/explain", json={"model": "translate", "input": "我爱北京", "method": "attention"})
        chat = client.post("/v1/explain", json={"model": "chat", "input": "我爱北京", "steps": 8})
    assert mt.status_code == 200 and chat.status_code == 200, (mt.text, chat.text)
    for e in [*mt.json()["data"], *chat.json()["data"]]:
        assert "".join(t["token"] for t in e["tokens"]) == "我爱北京" and e["extra"]["token"]


def test_body_over_the_limit_is_413_and_bad_json_is_422(make_app) -> None:
    with TestClient(make_app(max_body_bytes=200)) as client:
        r = client.post("/v1/classify", json={"model": "classify", "input": ["好" * 300]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        bad = client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "error" in bad.json()


def test_api_key_is_required_on_the_api_when_set(make_app) -> None:
    with TestClient(make_app(api_key="s3cret")) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        assert client.get("/metrics").status_code == 401  # the server's load is the operator's, not the public's
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_explain_refusals_speak_of_the_request_fields(make_app) -> None:
    with TestClient(make_app()) as client:
        label = client.post("/v1/explain", json={"model": "classify", "input": "好", "label": "maybe"})
        empty = client.post("/v1/explain", json={"model": "classify", "input": []})
    assert label.status_code == 422 and label.json()["error"]["param"] == "label"
    assert "--" not in label.json()["error"]["message"] and "label 'maybe'" in label.json()["error"]["message"]
    assert empty.status_code == 422 and empty.json()["error"]["message"].startswith("input is empty")


def test_a_body_that_is_not_json_names_no_field(make_app) -> None:
    with TestClient(make_app()) as client:
        r = client.post(
            "/v1/classify", content=b'{"model": "x", "input": ["a"', headers={"content-type": "application/json"}
        )
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] is None and "not valid JSON (at character 28)" in error["message"]


def test_a_post_route_asked_with_get_is_405_naming_the_method(make_app) -> None:
    with TestClient(make_app()) as client:
        r = client.get("/v1/classify")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "takes POST" in r.json()["error"]["message"]


async def _concurrently(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


def test_concurrent_requests_are_batched_with_unchanged_results(make_app, served) -> None:
    texts = [f"第{i}条评论：房间{'很' * i}好" for i in range(12)]
    app = make_app(max_wait_ms=100, max_batch=32)
    with TestClient(app):  # runs the lifespan; requests go through the ASGI transport concurrently
        responses = asyncio.run(
            _concurrently(app, [("/v1/classify", {"model": "classify", "input": [t]}) for t in texts])
        )
        metrics = TestClient(app).get("/metrics").text
    direct = served["classify"].classify([{"text": t} for t in texts])
    assert [r.json()["data"][0]["label"] for r in responses] == [d["label"] for d in direct]
    for r, d in zip(responses, direct, strict=True):
        assert r.json()["data"][0]["score"] == pytest.approx(d["score"], abs=1e-5)
    # 12 one-text requests arrived within the wait: fewer model calls than requests
    calls = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('lmforge_batch_size_count{model="classify"}')
    )
    assert calls < 12
    assert 'lmforge_requests_total{endpoint="/v1/classify",status="200"}' in metrics


def test_a_full_queue_answers_503_with_retry_after_never_500(make_app, served, monkeypatch) -> None:
    real = served["classify"].classify

    def slow(examples):
        time.sleep(0.2)
        return real(examples)

    monkeypatch.setattr(served["classify"], "classify", slow)
    app = make_app(queue_size=1, max_batch=1, max_wait_ms=0)
    with TestClient(app):
        responses = asyncio.run(_concurrently(app, [("/v1/classify", {"model": "classify", "input": ["好"]})] * 8))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "overloaded_error"


def test_a_slow_answer_times_out_with_504(make_app, served, monkeypatch) -> None:
    monkeypatch.setattr(served["classify"], "classify", lambda examples: time.sleep(1.0) or [])
    with TestClient(make_app(timeout_s=0.1)) as client:
        r = client.post("/v1/classify", json={"model": "classify", "input": ["好"]})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"


def test_a_failing_model_is_a_500_for_that_request_only(make_app, served, monkeypatch) -> None:
    def broken(examples):
        raise RuntimeError("boom")

    monkeypatch.setattr(served["ner"], "ner", broken)
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        r = client.post("/v1/ner", json={"model": "ner", "input": ["北京"]})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert client.post("/v1/classify", json={"model": "classify", "input": ["好"]}).status_code == 200


def test_openai_client_against_a_live_server(live_server: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "我爱北京"}], temperature=0, max_tokens=12
    )
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "我爱北京"}], temperature=0, max_tokens=12, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces).strip() == reply.choices[0].message.content
    vectors = client.embeddings.create(model="embed", input=["你好", "再见"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 32
    assert [m.id for m in client.models.list().data] == ["classify", "ner", "translate", "embed", "chat"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing", input=["x"])
    assert httpx.get(f"{live_server}/healthz").json()["status"] == "ok"


def test_serve_command_refuses_an_open_host_without_a_key(capsys, run_dirs) -> None:
    assert main(["serve", "--model", f"c={run_dirs['classify']}", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().out
    with pytest.raises(ValueError, match="NAME=RUN_DIR"):
        parse_models(["just-a-path"])
    with pytest.raises(ValueError, match="given twice"):
        parse_models(["a=x", "a=y"])
    assert main(["serve", "--model", "c=/does/not/exist"]) == 2


def test_shutdown_finishes_the_request_in_flight(served, monkeypatch, server_factory) -> None:
    import threading

    from lmforge.serve.app import Limits, create_app

    real = served["classify"].classify
    in_model = threading.Event()

    def slow(examples):
        in_model.set()
        time.sleep(0.8)
        return real(examples)

    monkeypatch.setattr(served["classify"], "classify", slow)
    server, thread, url = server_factory(create_app(served, Limits()), timeout_graceful_shutdown=10)
    answer: dict = {}

    def ask() -> None:
        answer["r"] = httpx.post(f"{url}/v1/classify", json={"model": "classify", "input": ["好"]}, timeout=30)

    client = threading.Thread(target=ask)
    client.start()
    assert in_model.wait(timeout=30), "the request never reached the model"
    server.should_exit = True  # what SIGINT / SIGTERM do
    client.join(timeout=30)
    thread.join(timeout=30)
    assert answer["r"].status_code == 200 and answer["r"].json()["data"][0]["label"] in ("neg", "pos")
    assert not thread.is_alive()
