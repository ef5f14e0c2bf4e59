"""``POST /v1/completions``: OpenAI's legacy completions with ``echo`` and ``logprobs`` (the prompt's token
log-probabilities, equal to ``evals/scoring``'s), its refusals, and EleutherAI's lm-evaluation-harness scoring an
lmforge model through it with the same accuracy and log-likelihoods as ``lmforge evaluate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.evals.run import EvalSettings, evaluate_task
from lmforge.evals.scoring import encode_pair, score
from lmforge.evals.tasks import EvalTask, load_task
from lmforge.serve.app import create_app
from lmforge.serve.models import load_served


@pytest.fixture(scope="module")
def gpt(chat_gpt: Path):
    return load_served("gpt", chat_gpt)


@pytest.fixture()
def client(gpt, served: dict):
    from fastapi.testclient import TestClient

    with TestClient(create_app({"gpt": gpt, "classify": served["classify"]})) as c:
        yield c


def test_echo_returns_the_prompts_token_log_probabilities(client, gpt) -> None:
    tok = gpt.task.tokenizer
    context, continuation = encode_pair(tok, "这家酒店", "很好，房间干净")
    body = {"model": "gpt", "prompt": [context + continuation], "max_tokens": 1, "echo": True, "logprobs": 1}
    reply = client.post("/v1/completions", json={**body, "temperature": 0})
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    logprobs = choice["logprobs"]
    n = len(context) + len(continuation)
    assert len(logprobs["token_logprobs"]) == n + 1 and logprobs["token_logprobs"][0] is None
    assert len(logprobs["top_logprobs"]) == n + 1 and all(len(t) == 1 for t in logprobs["top_logprobs"][1:])
    (expected,) = score(gpt.model, [(context, continuation)], window=64)
    assert sum(logprobs["token_logprobs"][len(context) : -1]) == pytest.approx(expected.logprob, abs=1e-4)
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())  # temperature 0: the argmax
    assert reply.json()["usage"]["completion_tokens"] == 1


def test_a_text_prompt_is_continued(client) -> None:
    reply = client.post(
        "/v1/completions", json={"model": "gpt", "prompt": "这家酒店", "max_tokens": 3, "temperature": 0}
    )
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    assert choice["logprobs"] is None and isinstance(choice["text"], str)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": [[1, 2, 10**6]]}, 422, "prompt[0] has token id 1000000; ids are 0.."),
        ({"prompt": "酒店", "max_tokens": 0}, 422, "max_tokens=0 generates nothing"),
        ({"prompt": [list(range(1, 64))], "max_tokens": 2}, 413, "prompt[0] has 63 tokens"),
        ({"prompt": "酒店", "model": "classify"}, 400, "serves /v1/classify"),
    ],
)
def test_what_cannot_be_completed_is_refused(client, body: dict, status: int, message: str) -> None:
    reply = client.post("/v1/completions", json={"model": "gpt", **body})
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]["message"]


def _harness_task(directory: Path, task: EvalTask) -> str:
    """A local lm-evaluation-harness task over ``task``'s rows (a JSONL of context, choices, answer)."""
    rows = directory / "rows.jsonl"
    with rows.open("w", encoding="utf-8") as f:
        for item in task.items:
            f.write(json.dumps({"context": item.context, "choices": list(item.choices), "answer": item.answer}) + "\n")
    (directory / "lmforge_rows.yaml").write_text(
        "task: lmforge_rows\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    return "lmforge_rows"


def test_lm_evaluation_harness_scores_through_the_server_as_lmforge_does(
    chat_gpt: Path, gpt, server_factory, tmp_path: Path
) -> None:
    tok = gpt.task.tokenizer
    full = load_task("reviews-sentiment-prompt")
    short = [i for i in full.items if all(sum(map(len, encode_pair(tok, i.context, c))) <= 48 for c in i.choices)]
    task = EvalTask("rows", "choice", short[:24], source="reviews-sentiment-prompt")
    assert len(task.items) == 24
    ours = evaluate_task(gpt.run, task, EvalSettings(window=63))
    _, _, url = server_factory(create_app({"gpt": gpt}))
    name = _harness_task(tmp_path, task)
    model_args = (
        f"model=gpt,base_url={url}/v1/completions,tokenizer={chat_gpt},tokenizer_backend=huggingface,"
        "tokenized_requests=True,max_length=64,num_concurrent=1,max_retries=1"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", name, "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--batch_size", "4", "--log_samples"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    harness = json.loads(results_file.read_text())["results"][name]
    assert harness["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)
    (samples_file,) = (tmp_path / "out").rglob(f"samples_{name}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    requests = [encode_pair(tok, i.context, c) for i in task.items for c in i.choices]
    expected = [s.logprob for s in score(gpt.model, requests, window=63)]
    got = [float(resp[0][0]) for sample in samples for resp in sample["resps"]]
    assert got == pytest.approx(expected, abs=1e-4)
