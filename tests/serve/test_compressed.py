"""`lmforge serve` over int8 and ONNX copies of the classify, NER and embedding runs: the same endpoints, answers
equal to the copy's own predictions and close to the fp32 run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lmforge.cli import main
from lmforge.serve.app import Limits, create_app
from lmforge.serve.models import load_served

TEXTS = ["这家酒店很干净，服务也好", "太差了，再也不来", "国务院总理李鹏今天在北京会见了日本客人。"]


@pytest.fixture(scope="module")
def copies(run_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("copies")
    made = {}
    for task in ("classify", "ner", "embed"):
        made[f"{task}-int8"] = root / f"{task}-int8"
        assert main(["quantize", "--model", str(run_dirs[task]), "--out", str(made[f"{task}-int8"])]) == 0
        made[f"{task}-onnx"] = root / f"{task}-onnx"
        assert main(["export", "--to", "onnx", str(run_dirs[task]), "--out", str(made[f"{task}-onnx"])]) == 0
    return made


def test_every_copy_serves_its_task(copies: dict[str, Path], served: dict) -> None:
    models = {name: load_served(name, path) for name, path in copies.items()}
    with TestClient(create_app(models, Limits())) as client:
        listed = {m["id"]: m["task"] for m in client.get("/v1/models").json()["data"]}
        assert listed == {name: name.split("-")[0] for name in copies}
        for backend in ("int8", "onnx"):
            name = f"classify-{backend}"
            r = client.post("/v1/classify", json={"model": name, "input": TEXTS})
            assert r.status_code == 200
            mine = models[name].classify([{"text": t} for t in TEXTS])
            fp32 = served["classify"].classify([{"text": t} for t in TEXTS])
            for got, own, ref in zip(r.json()["data"], mine, fp32, strict=True):
                assert got["label"] == own["label"] and got["score"] == pytest.approx(own["score"], abs=1e-6)
                assert got["score"] == pytest.approx(ref["score"], abs=0.02 if backend == "int8" else 1e-4)
            r = client.post("/v1/ner", json={"model": f"ner-{backend}", "input": TEXTS[2:]})
            assert r.status_code == 200
            for e in r.json()["data"][0]["entities"]:
                assert TEXTS[2][e["start"] : e["end"]] == e["text"]
            r = client.post("/v1/embeddings", json={"model": f"embed-{backend}", "input": TEXTS})
            assert r.status_code == 200
            got = np.array([d["embedding"] for d in r.json()["data"]])
            want = np.asarray(served["embed"].embed(TEXTS))  # unit vectors: the dot product is the cosine
            assert (got * want).sum(1).min() > (0.99 if backend == "int8" else 0.99999)
