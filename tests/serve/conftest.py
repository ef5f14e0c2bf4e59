"""Tiny run directories of every servable task, the app over them, and a live uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_conll, write_jsonl
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.registry import save_model
from lmforge.serve.app import Limits, create_app
from lmforge.serve.models import load_served

GENERATION = Path(__file__).resolve().parents[1] / "fixtures" / "generation"
FAST = [
    "--training.no-progress",
    "--training.peak-tflops",
    "1",
    "--training.log-every",
    "1",
    "--epochs",
    "0",
    "--training.max-steps",
    "6",
    "--training.eval-every",
    "0",
    "--max-len",
    "48",
]


@pytest.fixture(scope="session")
def run_dirs(
    tmp_path_factory: pytest.TempPathFactory, review_wordpiece: Path, tiny_translator: Path
) -> dict[str, Path]:
    """name -> run directory: classify, ner (tiny BERTs fine-tuned a few steps), translate (the zh->en
    fixture), embed (a plain BERT: first-token vectors), chat (the GPT fixture)."""
    root = tmp_path_factory.mktemp("serve")
    vocab = load_tokenizer(review_wordpiece).vocab_size
    bert = root / "bert"
    cfg = BertConfig(
        vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, dropout=0.0, attn_dropout=0.0
    )
    save_model(Bert(cfg), bert)
    copy_tokenizer_files(review_wordpiece, bert)
    reviews = load_builtin("reviews-sentiment")
    write_jsonl(root / "cls-train.jsonl", reviews["train"][:64])
    write_jsonl(root / "cls-dev.jsonl", reviews["dev"][:16])
    assert (
        main(
            [
                "finetune",
                "classify",
                "--model",
                str(bert),
                "--train",
                str(root / "cls-train.jsonl"),
                "--dev",
                str(root / "cls-dev.jsonl"),
                "--out",
                str(root / "classify"),
                *FAST,
            ]
        )
        == 0
    )
    sentences = load_builtin("peoples-daily-ner")
    write_conll(root / "ner-train.conll", sentences["train"][:64])
    write_conll(root / "ner-dev.conll", sentences["dev"][:16])
    assert (
        main(
            [
                "finetune",
                "ner",
                "--model",
                str(bert),
                "--train",
                str(root / "ner-train.conll"),
                "--dev",
                str(root / "ner-dev.conll"),
                "--out",
                str(root / "ner"),
                *FAST,
            ]
        )
        == 0
    )
    return {
        "classify": root / "classify",
        "ner": root / "ner",
        "translate": tiny_translator,
        "embed": bert,
        "chat": GENERATION / "gpt",
    }


@pytest.fixture(scope="session")
def served(run_dirs: dict[str, Path]) -> dict:
    return {name: load_served(name, path) for name, path in run_dirs.items()}


@pytest.fixture()
def make_app(served: dict):
    def make(**limits):
        return create_app(served, Limits(**limits))

    return make


def loopback_socket() -> socket.socket:
    """A listening-ready socket bound to a free loopback port, handed to uvicorn as it is: no window in
    which another process could take the port between choosing it and binding it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_server(app, **config) -> tuple[uvicorn.Server, threading.Thread, str]:
    """``app`` under a real uvicorn in a thread on a free loopback port; returns (server, thread, base URL)
    once it accepts connections."""
    sock = loopback_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture()
def server_factory():
    """``start(app, **uvicorn_config)`` -> (server, thread, base URL); every server is stopped afterwards."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app, **config):
        server, thread, url = start_server(app, **config)
        started.append((server, thread))
        return server, thread, url

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server(served: dict) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port (in a thread); yields its base URL."""
    server, thread, url = start_server(create_app(served, Limits()))
    yield url
    server.should_exit = True
    thread.join(timeout=30)
