"""Shared test setup: offline, deterministic, single-threaded torch, small fixtures."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

# Offline by construction: transformers and huggingface_hub must never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests draw the same examples on every run (derandomize): a failure always reproduces, so a
# property test can never be a test that fails now and then; no example database is written either.
settings.register_profile(
    "lmforge",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("lmforge")

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    # Two torch threads on a 2-core machine shared with the test runner oversubscribe; one is steadier.
    torch.set_num_threads(1)
    # The CLI's rich console wraps at the terminal width (80 without a terminal), which splits the long
    # temporary paths in the messages the tests look for; a wide console keeps each message on one line.
    from lmforge import cli

    cli.console.width = 400


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _run_process(cmd: list[str], *, timeout: float = 300, env: dict | None = None, check: bool = True) -> str:
    """Run ``cmd`` (in its own process group) and return its output (stdout and stderr together).

    A failure shows the command, its exit status and the tail of its output; a command that runs past
    ``timeout`` has its whole process group killed (torchrun's workers too) and shows what it printed.
    """
    # A private TMPDIR, removed afterwards: torchrun's agent leaves a torchelastic_* directory in it per run.
    with tempfile.TemporaryDirectory(prefix="lmforge-child-") as scratch:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": scratch, **(env or {})}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{' '.join(cmd)}\nran past {timeout} s and was killed; its output:\n{out[-6000:]}")
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexited {proc.returncode}; its output:\n{out[-6000:]}")
    return out


@pytest.fixture(scope="session")
def run_process() -> Callable[..., str]:
    """``run_process(cmd, timeout=300, env=None, check=True)``: a child process with its output in every failure."""
    return _run_process


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mixed_corpus() -> Path:
    return FIXTURES / "mixed.txt"


def _tokenizer(directory: Path, corpus: Path, *, kind: str, vocab_size: int) -> Path:
    from lmforge.data.readers import read_text_lines
    from lmforge.data.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(train_tokenizer(lambda: read_text_lines(corpus), kind=kind, vocab_size=vocab_size), directory)


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory: pytest.TempPathFactory, mixed_corpus: Path) -> Path:
    return _tokenizer(tmp_path_factory.mktemp("wordpiece"), mixed_corpus, kind="wordpiece", vocab_size=400)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory, mixed_corpus: Path) -> Path:
    return _tokenizer(tmp_path_factory.mktemp("bpe"), mixed_corpus, kind="bpe", vocab_size=400)


@pytest.fixture(scope="session")
def tatoeba_path() -> Path:
    """The Tatoeba pairs shipped with lmforge (lmforge/data/tatoeba)."""
    from lmforge.data.builtin import TATOEBA_SHIPPED

    return TATOEBA_SHIPPED


@pytest.fixture(scope="session")
def review_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 real review texts as a plain-text corpus (one document per line)."""
    from lmforge.data.builtin import load_builtin

    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    texts = [ex["text"] for ex in load_builtin("reviews-sentiment")["train"][:3000]]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def review_wordpiece(tmp_path_factory: pytest.TempPathFactory, review_corpus: Path) -> Path:
    return _tokenizer(tmp_path_factory.mktemp("review-wordpiece"), review_corpus, kind="wordpiece", vocab_size=3000)


@pytest.fixture(scope="session")
def review_bpe(tmp_path_factory: pytest.TempPathFactory, review_corpus: Path) -> Path:
    return _tokenizer(tmp_path_factory.mktemp("review-bpe"), review_corpus, kind="bpe", vocab_size=1000)


def _shards(factory: pytest.TempPathFactory, corpus: Path, tokenizer: Path, *, whole_word: bool = False) -> Path:
    from lmforge.data.shards import PrepareConfig, prepare

    out = factory.mktemp("shards")
    return prepare(
        PrepareConfig(
            tokenizer=str(tokenizer), out=str(out), input=[str(corpus)], whole_word=whole_word, val_fraction=0.02
        ),
        progress=False,
    )


@pytest.fixture(scope="session")
def mlm_shards(tmp_path_factory: pytest.TempPathFactory, review_corpus: Path, review_wordpiece: Path) -> Path:
    return _shards(tmp_path_factory, review_corpus, review_wordpiece)


@pytest.fixture(scope="session")
def wwm_shards(tmp_path_factory: pytest.TempPathFactory, review_corpus: Path, review_wordpiece: Path) -> Path:
    return _shards(tmp_path_factory, review_corpus, review_wordpiece, whole_word=True)


@pytest.fixture(scope="session")
def clm_shards(tmp_path_factory: pytest.TempPathFactory, review_corpus: Path, review_bpe: Path) -> Path:
    return _shards(tmp_path_factory, review_corpus, review_bpe)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, review_wordpiece: Path) -> Path:
    """A randomly initialised tiny BERT model directory with the review tokenizer (stands in for a pretrained one)."""
    from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
    from lmforge.models.bert import Bert, BertConfig
    from lmforge.models.registry import save_model

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = load_tokenizer(review_wordpiece).vocab_size
    cfg = BertConfig(
        vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, dropout=0.0, attn_dropout=0.0
    )
    torch.manual_seed(0)  # the same weights whichever test creates the fixture first
    save_model(Bert(cfg), directory)
    copy_tokenizer_files(review_wordpiece, directory)
    return directory


# --- planted-cue texts (distillation and explanation tests) ---------------------------------------------
CUE_POOL = list("房间服务酒店干净位置交通早餐价格环境前台设施卫生安静方便不错一般")


def _cue_texts(n: int, seed: int) -> list[dict]:
    """Random characters from ``CUE_POOL``; a positive text has one 好 somewhere (the only cue)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = [rng.choice(CUE_POOL) for _ in range(rng.randint(6, 14))]
        positive = rng.random() < 0.5
        if positive:
            chars.insert(rng.randrange(len(chars) + 1), "好")
        out.append({"text": "".join(chars), "label": "pos" if positive else "neg"})
    return out


@pytest.fixture(scope="session")
def cue_texts() -> Callable[[int, int], list[dict]]:
    """``cue_texts(n, seed)``: n labelled texts whose label is decided by one planted character (好)."""
    return _cue_texts


# --- tiny settings many tests share ------------------------------------------------------------------------
TINY_SEQ2SEQ = [
    *("--seq2seq.d-model", "32", "--seq2seq.d-ff", "64", "--seq2seq.n-heads", "2"),
    *("--seq2seq.n-encoder-layers", "1", "--seq2seq.n-decoder-layers", "1"),
]


@pytest.fixture(scope="session")
def tiny_seq2seq_flags() -> list[str]:
    """The command-line flags of a tiny Transformer encoder-decoder (d 32, 2 heads, one layer each side)."""
    return list(TINY_SEQ2SEQ)


def _tiny_train_config(**changes):
    from lmforge.train.config import OptimConfig, TrainConfig

    base = dict(
        max_steps=1,
        global_batch_size=8,
        micro_batch_size=8,
        eval_every=0,
        eval_batches=1,
        save_every=0,
        log_every=1,
        progress=False,
        peak_tflops=1.0,
        deterministic=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
    )
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="session")
def tiny_train_config():
    """``tiny_train_config(**changes)``: a TrainConfig for loop tests (one step of 8 items, constant lr 1e-3, no
    evaluation, checkpoint or progress bar, deterministic, a fixed peak of 1 TFLOP/s), with ``changes`` applied."""
    return _tiny_train_config


@pytest.fixture(scope="session")
def chat_gpt(tmp_path_factory: pytest.TempPathFactory, review_bpe: Path) -> Path:
    """A tiny GPT with a ChatML tokenizer (lmforge's BPE has the turn tokens): preference tuning, packed chat
    fine-tuning, language-model evaluation."""
    from lmforge.data.tokenizer import load_tokenizer, save_tokenizer
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.registry import save_model

    directory = tmp_path_factory.mktemp("chat-gpt")
    tok = load_tokenizer(review_bpe)
    torch.manual_seed(0)
    save_model(
        GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=2, d_model=32, d_ff=64, max_seq_len=64)), directory
    )
    save_tokenizer(tok, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_translator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zh -> en translate run: the committed tiny encoder-decoder (tests/fixtures/generation/seq2seq) with the
    task file a fine-tuning writes."""
    directory = tmp_path_factory.mktemp("translator") / "translate"
    shutil.copytree(Path(__file__).parent / "fixtures" / "generation" / "seq2seq", directory)
    settings = {"task": "translate", "src": "zh", "tgt": "en", "max_len": 24, "label_smoothing": 0.1}
    (directory / "task.json").write_text(json.dumps({**settings, "source_special_tokens": False}))
    return directory
