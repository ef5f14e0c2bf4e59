"""Property-based tests (Hypothesis, derandomized) of the server's request handling: arbitrary JSON bodies,
lone surrogates included, on every endpoint get a 2xx answer or a JSON error naming what is wrong, never a
500 and never a non-JSON body."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

ENDPOINTS = {
    "/v1/classify": "classify",
    "/v1/ner": "ner",
    "/v1/translate": "translate",
    "/v1/embeddings": "embed",
    "/v1/chat/completions": "chat",
}
TEXT = st.text(st.characters(), max_size=12)  # st.characters() includes lone surrogates
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "robot"]) | JSON, "content": TEXT | JSON}
)


def _valid(model: str) -> st.SearchStrategy:
    """Bodies of the right shape for ``model``'s endpoint, with any texts (lone surrogates now and then)."""
    if model == "chat":
        message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXT})
        return st.fixed_dictionaries(
            {"model": st.just("chat"), "messages": st.lists(message, min_size=1, max_size=3)},
            optional={
                "max_tokens": st.integers(1, 8),
                "temperature": st.floats(0, 2),
                "top_p": st.floats(0.05, 1),
                "seed": st.integers(-(2**64), 2**65),
                "stream": st.booleans(),
                "stop": TEXT | st.lists(TEXT, max_size=2),
            },
        )
    inputs = st.lists(TEXT.filter(str.strip), min_size=1, max_size=4)
    optional = {"num_beams": st.integers(1, 3), "max_tokens": st.integers(1, 8)} if model == "translate" else {}
    if model == "embed":
        optional = {"encoding_format": st.sampled_from(["float", "base64"])}
    return st.fixed_dictionaries({"model": st.just(model), "input": inputs}, optional=optional)


def _body(model: str) -> st.SearchStrategy:
    """Bodies of the right shape, bodies near the schema (fields of any shape) and arbitrary JSON."""
    models = st.sampled_from([model, "classify", "nope"]) | JSON
    near = st.fixed_dictionaries(
        {"model": models},
        optional={
            "input": st.lists(TEXT | st.lists(TEXT, max_size=3), max_size=4) | JSON,
            "messages": st.lists(MESSAGE, max_size=3) | JSON,
            "max_tokens": st.integers(-5, 40) | JSON,
            "temperature": st.floats(-1, 3) | JSON,
            "top_p": st.floats(-1, 2) | JSON,
            "seed": JSON,
            "stream": st.booleans(),
            "stop": TEXT | st.lists(TEXT, max_size=2) | JSON,
            "num_beams": st.integers(-1, 10) | JSON,
            "encoding_format": st.sampled_from(["float", "base64"]) | JSON,
        },
    )
    return _valid(model) | near | JSON


@pytest.fixture(scope="module")
def client(served):
    from lmforge.serve.app import Limits, create_app

    with TestClient(
        create_app(served, Limits(max_tokens=8, max_text_chars=50, max_inputs=4)), raise_server_exceptions=False
    ) as c:
        yield c


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
@settings(max_examples=70)
@given(data=st.data())
def test_any_json_body_is_answered_or_refused_by_name(client, path: str, data) -> None:
    body = data.draw(_body(ENDPOINTS[path]))
    raw = json.dumps(body)  # lone surrogates travel as \\udXXX escapes, as a client would send them
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413, 422), (r.status_code, r.text[:300], raw[:300])
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["code"] == r.status_code and error["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
    else:
        r.json()
