"""`lmforge explain`: Integrated Gradients' completeness, attention maps against the model's own attention, rollout
by hand, offsets of mixed Chinese/English text, attributions that find a planted cue, and the command end to end
for classify, NER and embedding runs (JSONL, HTML, PNG)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.readers import write_conll, write_jsonl
from lmforge.errors import UserError
from lmforge.explain.attribution import METHODS, attention_maps, attention_rollout
from lmforge.explain.targets import explain, explain_classification
from lmforge.models.bert import Bert, BertConfig
from lmforge.rundir import load_run

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--training.eval-every", "0", "--max-len", "32"]
POOL = list("房间服务酒店干净位置交通早餐价格环境前台设施卫生安静方便不错一般")


@pytest.fixture(scope="module")
def runs(cue_texts, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    write_jsonl(root / "train.jsonl", cue_texts(600, 1))
    write_jsonl(root / "dev.jsonl", cue_texts(100, 2))
    classify = ["finetune", "classify", "--model", str(tiny_bert), "--train", str(root / "train.jsonl")]
    args = [*classify, "--dev", str(root / "dev.jsonl"), "--out", str(root / "classify"), "--epochs", "5"]
    assert main([*args, "--training.optim.lr", "1e-3", *FAST]) == 0
    # the same on a BERT with hashed bigram embeddings (the demo's student): [SEP]'s embedding then depends on the
    # token before it, so it moves between the baseline and the text
    from lmforge.data.tokenizer import copy_tokenizer_files
    from lmforge.models.registry import read_config, save_model

    bigram = root / "bert-bigram"
    cfg = dataclasses.replace(read_config(tiny_bert), bigram_buckets=256)
    torch.manual_seed(0)
    save_model(Bert(cfg), bigram)
    copy_tokenizer_files(tiny_bert, bigram)
    args = [*classify, "--dev", str(root / "dev.jsonl"), "--out", str(root / "classify-bigram"), "--epochs", "5"]
    args[args.index("--model") + 1] = str(bigram)
    assert main([*args, "--training.optim.lr", "1e-3", *FAST]) == 0
    rng = random.Random(3)
    sentences = []
    for _ in range(300):
        tokens = [rng.choice(POOL) for _ in range(rng.randint(6, 12))]
        at = rng.randrange(len(tokens) - 1)
        tokens[at : at + 2] = [rng.choice("王李张刘陈杨黄赵"), rng.choice(POOL)]
        tags = ["O"] * len(tokens)
        tags[at : at + 2] = ["B-PER", "I-PER"]
        sentences.append({"tokens": tokens, "tags": tags})
    write_conll(root / "train.conll", sentences[:250])
    write_conll(root / "dev.conll", sentences[250:])
    ner = ["finetune", "ner", "--model", str(tiny_bert), "--train", str(root / "train.conll")]
    ner += ["--dev", str(root / "dev.conll"), "--out", str(root / "ner"), "--epochs", "15"]
    assert main([*ner, "--training.optim.lr", "3e-3", *FAST]) == 0
    return {
        "root": root,
        "classify": root / "classify",
        "classify-bigram": root / "classify-bigram",
        "ner": root / "ner",
        "bert": tiny_bert,
    }


@pytest.mark.parametrize("name", ["classify", "classify-bigram"])
def test_integrated_gradients_are_complete(runs, name: str) -> None:
    """The scores (with the special tokens' share) sum to f(x) - f(baseline): within 1% of that difference at 300
    steps (the Riemann sum's error)."""
    run = load_run(runs[name])
    text = "房间干净好位置不错"
    (ex,) = explain_classification(run, {"text": text}, method="ig", steps=300)
    total = sum(t.score for t in ex.tokens) + ex.extra["special_tokens"]
    task, model = run.task, run.model
    ids = task.encode([{"text": text}], split="t", need_labels=False)[0][0]
    base = torch.tensor([[ids[0], *([task.pad_id] * (len(ids) - 2)), ids[-1]]])
    with torch.no_grad():
        batch = {"input_ids": base, "attention_mask": torch.ones_like(base), "token_type_ids": None}
        f_base = float(task.logits(model, batch).softmax(-1)[0, task.labels.index(ex.target)])
    gap = ex.value - f_base
    assert abs(gap) > 0.05, "a difference worth attributing"
    assert abs(total - gap) <= 0.01 * abs(gap)
    assert abs(ex.delta) <= 0.01 * abs(gap)
    assert [t.token for t in ex.tokens] == list(text) and [(t.start, t.end) for t in ex.tokens] == [
        (i, i + 1) for i in range(len(text))
    ]


def test_attention_maps_are_the_probabilities_the_model_used() -> None:
    """Rows sum to 1 over real keys, padding keys get 0, and probabilities @ values reproduce the layer's output."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, dropout=0.0)
    model = Bert(cfg).eval()
    ids = torch.tensor([[2, 11, 12, 13, 3, 0, 0], [2, 14, 15, 16, 17, 18, 3]])
    mask = (torch.arange(7)[None, :] < torch.tensor([[5], [7]])).long()
    maps = attention_maps(model, ids, mask)  # (L, B, H, T, T)
    assert maps.shape == (2, 2, 4, 7, 7)
    torch.testing.assert_close(maps[:, 0, :, :5].sum(-1), torch.ones(2, 4, 5))
    assert maps[:, 0, :, :5, 5:].abs().max() == 0
    attn = model.layers[0].attn
    x = model.embed(ids, torch.arange(7).expand(2, 7))
    _, _, v = attn.qkv(x).split(attn.split, dim=-1)
    v = v.view(2, 7, 4, 8).transpose(1, 2)
    expected = attn.out((maps[0] @ v).transpose(1, 2).reshape(2, 7, 32))
    with torch.no_grad():
        built = model.embed(ids, torch.arange(7).expand(2, 7))
        from lmforge.models.layers import build_attention_mask

        sdpa_mask, _ = build_attention_mask(mask, q_len=7, k_len=7, causal=False)
        actual = attn(built, mask=sdpa_mask)
    torch.testing.assert_close(expected[0, :5], actual[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected[1], actual[1], atol=1e-5, rtol=1e-5)


def test_attention_rollout_by_hand() -> None:
    """Two layers, one head, three tokens: A_l' = (0.5 A_l + 0.5 I), rows renormalised; rollout = A_2' A_1'."""
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
    maps = torch.stack([a1, a2])[:, None]  # (L=2, H=1, 3, 3)
    r1 = 0.5 * a1 + 0.5 * torch.eye(3)
    r2 = 0.5 * a2 + 0.5 * torch.eye(3)
    torch.testing.assert_close(attention_rollout(maps), r2 @ r1)
    # layer 1 row 0 by hand: 0.5*[0.5, 0.5, 0] + 0.5*[1, 0, 0] = [0.75, 0.25, 0]; layer 2 row 0 = [1, 0, 0]
    torch.testing.assert_close(attention_rollout(maps)[0], torch.tensor([0.75, 0.25, 0.0]))
    # a padding position: its column is dropped and the rows renormalised without it
    masked = attention_rollout(maps, real=torch.tensor([True, True, False]))
    assert masked[:, 2].abs().max() == 0 and masked[2].abs().max() == 0
    torch.testing.assert_close(masked[:2, :2].sum(-1), torch.ones(2))


def test_scores_line_up_with_the_characters_of_mixed_text(runs) -> None:
    run = load_run(runs["classify"])
    text = "The room 很好, price OK 价格不错"
    for method in METHODS:
        (ex,) = explain_classification(run, {"text": text}, method=method, steps=8)
        for t in ex.tokens:
            assert text[t.start : t.end] == t.token, (method, t)
        assert any(t.token == "很" for t in ex.tokens) and any(text[t.start : t.end] == "好" for t in ex.tokens)
        latin = [t.token for t in ex.tokens if t.token.isascii() and t.token.strip(",")]
        assert "".join(latin).lower().replace("##", "") in ("theroompriceok", "theroomprice,ok"), latin


def test_every_method_finds_the_planted_cue(cue_texts, runs) -> None:
    """The classifier learned that 好 alone makes a text positive: on positive test texts it predicts positive, the
    top-scored character is 好 for every gradient and occlusion method."""
    run = load_run(runs["classify"])
    positives = [ex["text"] for ex in cue_texts(80, 9) if ex["label"] == "pos"][:20]
    for method in ("ig", "grad-x-input", "occlusion"):
        hits = 0
        for text in positives:
            (ex,) = explain_classification(run, {"text": text}, method=method, label="pos", steps=20)
            hits += max(ex.tokens, key=lambda t: t.score).token == "好"
        assert hits >= 0.9 * len(positives), (method, hits)


def test_ner_explanations_score_each_word_of_the_sentence(runs) -> None:
    run = load_run(runs["ner"])
    text = "房间王服务干净"  # 王 starts a PER in every training sentence
    for method in METHODS:
        exps = explain(run, {"text": text}, method=method, steps=16)
        assert exps, "an entity was predicted"
        for ex in exps:
            assert [t.token for t in ex.tokens] == list(text)
            assert ex.target.startswith("PER ") and 0.0 <= ex.value <= 1.0
            inside = ex.extra["inside"]
            assert text[ex.extra["start"] : ex.extra["end"]] == "".join(text[i] for i in inside)
    ig = explain(run, {"text": text}, method="ig", steps=200)[0]
    assert abs(ig.delta) <= 0.01 * max(abs(sum(t.score for t in ig.tokens)), 1e-3)


def test_explain_command_writes_jsonl_html_and_png(runs, tmp_path: Path) -> None:
    from lmforge.explain.views import CJK_FONTS, cjk_font

    try:
        cjk_font()
    except UserError:
        if os.environ.get("CI"):
            raise  # .ci/run installs fonts-wqy-microhei: a missing font there is a defect
        pytest.skip(f"no CJK font ({', '.join(CJK_FONTS)}) on this machine: apt install fonts-wqy-microhei")
    texts = tmp_path / "texts.txt"
    texts.write_text("房间干净好位置不错\n价格一般 but OK\n", encoding="utf-8")
    out = tmp_path / "out" / "classify.jsonl"
    assert main(["explain", "--model", str(runs["classify"]), "--input", str(texts), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["input"] for r in rows] == [0, 1] and rows[0]["method"] == "ig"
    assert rows[0]["tokens"][0] == {"token": "房", "start": 0, "end": 1, "score": rows[0]["tokens"][0]["score"]}
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    assert page.count('<div class="ex">') == 2 and 'title="+' in page and "<script" not in page
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ner_out = tmp_path / "ner.jsonl"
    args = ["explain", "--model", str(runs["ner"]), "--text", "房间王服务干净", "--output", str(ner_out)]
    assert main([*args, "--method", "occlusion", "--no-png"]) == 0
    assert json.loads(ner_out.read_text(encoding="utf-8").splitlines()[0])["target"].startswith("PER ")
    assert not ner_out.with_suffix(".png").exists()
    embed_out = tmp_path / "embed.jsonl"
    args = ["explain", "--model", str(runs["bert"]), "--text", "房间干净", "--text-pair", "房间很干净"]
    assert main([*args, "--output", str(embed_out), "--no-png", "--method", "grad-x-input"]) == 0
    pair = [json.loads(line) for line in embed_out.read_text(encoding="utf-8").splitlines()]
    assert [p["text"] for p in pair] == ["房间干净", "房间很干净"]
    assert pair[0]["value"] == pytest.approx(pair[1]["value"])  # one cosine, seen from each side


def _need_cjk_font() -> str:
    from lmforge.explain.views import CJK_FONTS, cjk_font

    try:
        return cjk_font()
    except UserError:
        if os.environ.get("CI"):
            raise  # .ci/run installs fonts-wqy-microhei: a missing font there is a defect
        pytest.skip(f"no CJK font ({', '.join(CJK_FONTS)}) on this machine: apt install fonts-wqy-microhei")


def test_a_text_longer_than_the_window_is_explained_as_far_as_it_was_read_and_says_so(
    runs, tmp_path: Path, caplog
) -> None:
    """Before, a 100,000-character text drew all of itself (a 58 MB PNG) while the model had read 32 tokens.
    Now the JSONL records where reading stopped, the log and both pictures say what was left out, and the PNG
    is the same size whatever follows the window."""
    import matplotlib.image

    _need_cjk_font()
    long = "".join(random.Random(0).choice(POOL) for _ in range(3000))
    sizes = []
    for n in (300, 3000):
        out = tmp_path / f"long{n}.jsonl"
        (tmp_path / f"long{n}.txt").write_text(long[:n] + "\n", encoding="utf-8")
        args = ["explain", "--model", str(runs["classify"]), "--input", str(tmp_path / f"long{n}.txt")]
        assert main([*args, "--output", str(out), "--method", "occlusion"]) == 0
        row = json.loads(out.read_text(encoding="utf-8"))
        read = row["extra"]["read_chars"]
        assert read == max(t["end"] for t in row["tokens"]) and 0 < read < 40  # 30 text tokens of max-len 32
        assert f"the model read the first {read} of its {n} characters" in caplog.text
        assert f"{n - read:,} more characters: beyond the model" in out.with_suffix(".html").read_text()
        sizes.append(matplotlib.image.imread(out.with_suffix(".png")).shape)
    assert sizes[0] == sizes[1]


def test_the_png_is_bounded_however_many_and_long_the_explanations(tmp_path: Path, monkeypatch) -> None:
    """At most PNG_LINES_EACH lines of each text and PNG_LINES in all (here 2 and 6, so that the test draws
    little): twelve 3,000-character explanations give the picture that the first three do, plus the line
    saying that the rest are on the HTML page."""
    import matplotlib.image

    from lmforge.explain import views
    from lmforge.explain.attribution import Explanation, TokenScore

    monkeypatch.setattr(views, "PNG_LINES_EACH", 2)
    monkeypatch.setattr(views, "PNG_LINES", 6)
    font = _need_cjk_font()
    text = "".join(random.Random(1).choice(POOL) for _ in range(3000))
    tokens = [TokenScore(ch, i, i + 1, math.sin(i)) for i, ch in enumerate(text)]
    ex = Explanation(text=text, target="pos", method="ig", value=0.9, tokens=tokens)
    heights = {}
    for n in (1, 3, 12):
        views.render_png([ex] * n, tmp_path / f"{n}.png", font=font)
        heights[n] = matplotlib.image.imread(tmp_path / f"{n}.png").shape[0]
    each = (heights[3] - heights[1]) / 2  # one explanation's height: its head line and 2 of its 75 lines
    assert 0 < each < 200
    assert 0 < heights[12] - heights[3] < 50  # only the "… 9 more explanations" line differs


def test_explain_refuses_bad_requests_before_any_work(runs, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x.jsonl")
    cases = [
        (["--model", str(runs["classify"]), "--output", out], "exactly one of --input"),
        (["--model", str(runs["classify"]), "--text", "好", "--label", "maybe", "--output", out], "not one of"),
        (["--model", str(runs["ner"]), "--text", "好", "--label", "pos", "--output", out], "--label is for"),
        (["--model", str(runs["bert"]), "--text", "好", "--output", out, "--no-png"], "text_pair|--text-pair"),
        (["--model", str(runs["classify"]), "--text", "好", "--steps", "0", "--output", out], "--steps 0"),
    ]
    for args, message in cases:
        assert main(["explain", *args]) != 0
        captured = capsys.readouterr()
        said = captured.out + captured.err
        assert any(m in said for m in message.split("|")), (args, said)
    assert not Path(out).exists()


def test_rollout_rows_of_a_real_model_are_distributions(runs) -> None:
    run = load_run(runs["classify"])
    ids = torch.tensor([run.task.encode([{"text": "房间干净好"}], split="t", need_labels=False)[0][0].tolist()])
    rolled = attention_rollout(attention_maps(run.model, ids, torch.ones_like(ids))[:, 0])
    np.testing.assert_allclose(rolled.sum(-1).numpy(), 1.0, rtol=1e-5)


def test_deleting_the_top_token_hurts_more_than_a_random_one(cue_texts, runs) -> None:
    """On positive texts whose only cue is 好, IG's top token is the cue: deleting it drops p(pos) far more than
    deleting a random character; sufficiency of its top tokens is small, comprehensiveness large."""
    from lmforge.explain.faithfulness import faithfulness

    run = load_run(runs["classify"])
    positives = [ex["text"] for ex in cue_texts(60, 21) if ex["label"] == "pos"][:12]
    results = [faithfulness(run, t, method="ig", steps=20) for t in positives]
    assert all(r["label"] == "pos" for r in results)
    top = np.mean([r["deletion_top"][1] for r in results])
    rand = np.mean([r["deletion_random"][1] for r in results])
    assert top > 0.3 and top > 3 * rand, (top, rand)
    assert np.mean([r["comprehensiveness"] for r in results]) > np.mean([r["sufficiency"] for r in results])


GENERATION = Path(__file__).resolve().parents[1] / "fixtures" / "generation"


def test_translation_and_gpt_explanations_per_generated_token(tmp_path: Path) -> None:
    """Translate and GPT runs: one explanation per generated token (its teacher-forced probability), the source /
    prompt characters each shown once (byte-level BPE pieces of a character merged), IG complete, cross-attention
    rows distributions over the source; occlusion refused (no [MASK])."""
    import shutil

    from lmforge.explain.attribution import cross_attention_maps

    mt = tmp_path / "mt"
    shutil.copytree(GENERATION / "seq2seq", mt)
    settings = {"task": "translate", "src": "zh", "tgt": "en", "max_len": 24, "label_smoothing": 0.1}
    (mt / "task.json").write_text(json.dumps({**settings, "source_special_tokens": False}))
    for directory, text in ((mt, "我爱北京天安门"), (GENERATION / "gpt", "我爱北京")):
        run = load_run(directory)
        ig = explain(run, {"text": text}, method="ig", steps=64)
        assert ig, "something was generated"
        for e in ig:
            assert "".join(t.token for t in e.tokens) == text
            assert [(t.start, t.end) for t in e.tokens] == sorted({(t.start, t.end) for t in e.tokens})
            assert 0.0 <= e.value <= 1.0
            assert abs(e.delta) <= 0.01 * max(abs(sum(t.score for t in e.tokens)), 0.01), (directory.name, e.delta)
        attention = explain(run, {"text": text}, method="attention")
        assert [e.target for e in attention] == [e.target for e in ig]  # the same greedy tokens
        with pytest.raises(UserError, match="occlusion"):
            explain(run, {"text": text}, method="occlusion")
        with pytest.raises(UserError, match="--baseline mask"):  # no [MASK]: the flag is refused, not ignored
            explain(run, {"text": text}, method="ig", baseline="mask")
        with pytest.raises(UserError, match="--label is for"):
            explain(run, {"text": text}, method="ig", label="pos")
    import dataclasses

    chat = dataclasses.replace(load_run(GENERATION / "gpt"), finetuned=True)  # as a chat model: the ChatML prompt
    (first, *_) = explain(chat, {"text": "我爱北京"}, method="grad-x-input") or [None]
    if first is not None:  # the fixture may end its reply at once
        assert "".join(t.token for t in first.tokens) == "我爱北京"
    run = load_run(mt)
    src = torch.tensor([run.task.encode_sources(["我爱北京"])[0][0]])
    maps = cross_attention_maps(run.model, src, torch.tensor([[2, 5, 7]]))  # (L, 1, H, 3, S)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))


def test_a_report_passes_over_sentences_with_more_entities_than_it_explains(monkeypatch) -> None:
    """An untrained NER model predicts entities everywhere: the report explains only sentences with at most
    MAX_OUTPUTS predicted entities, so its cost is bounded (it was most of test_compare.py's time)."""
    from types import SimpleNamespace

    from lmforge.explain import report

    class Tagger:
        def report_input(self, example: dict) -> dict:
            return {"text": example["text"]}

        def report_outcome(self, example: dict, text: dict, prediction: dict):
            return [], [e["type"] for e in prediction["entities"]]

        def predict(self, model, texts, *, device):
            return [{"entities": [{"type": "PER"}] * (1 if t["text"] == "few" else 9)} for t in texts]

    explained = []
    monkeypatch.setattr(report, "explain", lambda run, text, **kw: explained.append(text["text"]) or [])
    run = SimpleNamespace(task=Tagger(), model=None)
    rows = report.explained_examples(run, [{"text": "many"}] * 5 + [{"text": "few"}])
    assert explained == ["few"] and [r["text"] for r in rows] == ["few"]
