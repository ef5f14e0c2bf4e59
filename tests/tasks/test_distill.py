"""`lmforge distill`: the soft-target loss by hand, the unlabelled-text reader, the cached teacher logits (and
their resumption), and a tiny distillation that beats the same student trained without the teacher."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.readers import write_jsonl
from lmforge.errors import UserError
from lmforge.rundir import load_run
from lmforge.tasks.distill import CHUNK, soft_target_loss, unlabelled_texts

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--training.eval-every", "0", "--max-len", "32"]


def test_soft_target_loss_is_t_squared_times_kl_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    t = 2.0
    for row in range(2):
        p = torch.softmax(teacher[row] / t, -1)
        q = torch.softmax(student[row] / t, -1)
        by_hand = t * t * sum(float(p[c] * torch.log(p[c] / q[c])) for c in range(3))
        assert float(soft_target_loss(student, teacher, t)[row]) == pytest.approx(by_hand, rel=1e-5)
    assert soft_target_loss(teacher, teacher, t).abs().max() < 1e-6  # no loss when the student agrees


def test_unlabelled_texts_cut_long_documents_at_sentence_ends(tmp_path: Path) -> None:
    path = tmp_path / "u.txt"
    path.write_text(
        "短句。\n" + "第一句很长很长。第二句也很长很长！第三句？\n\n" + "无标点" * 10 + "\n", encoding="utf-8"
    )
    texts = [ex["text"] for ex in unlabelled_texts([str(path)], limit=100, max_chars=10)]
    assert texts[0] == "短句。"
    assert texts[1:4] == ["第一句很长很长。", "第二句也很长很长！", "第三句？"]
    assert all(len(t) <= 10 for t in texts) and "".join(texts[4:]) == "无标点" * 10
    assert len(unlabelled_texts([str(path)], limit=2, max_chars=10)) == 2
    with pytest.raises(UserError, match="no such file"):
        unlabelled_texts([str(tmp_path / "missing.txt")], limit=1, max_chars=10)


# A synthetic task on review characters: "pos" when the text holds 好, else "neg". A teacher trained on 1,200
# labelled texts knows it; a student with 24 labelled texts alone does not, and learns it from the teacher's
# soft labels on 1,200 unlabelled texts.
@pytest.fixture(scope="module")
def synthetic(cue_texts, tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    files = {"big": cue_texts(1200, 1), "small": cue_texts(24, 2), "dev": cue_texts(200, 3), "test": cue_texts(400, 4)}
    for name, rows in files.items():
        write_jsonl(root / f"{name}.jsonl", rows)
    (root / "unlabelled.txt").write_text("\n".join(ex["text"] for ex in cue_texts(1200, 5)) + "\n", encoding="utf-8")
    common = ["--model", str(tiny_bert), "--dev", str(root / "dev.jsonl"), "--test", str(root / "test.jsonl")]
    teacher = ["finetune", "classify", "--train", str(root / "big.jsonl"), "--out", str(root / "teacher")]
    assert main([*teacher, *common, "--epochs", "6", "--training.optim.lr", "1e-3", *FAST]) == 0
    return {"root": root, "teacher": root / "teacher", "bert": tiny_bert, "common": common}


def _test_accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "results.json").read_text())["test"]["accuracy"]


def test_a_distilled_student_beats_the_same_student_alone(synthetic) -> None:
    root, common = synthetic["root"], synthetic["common"]
    student = ["--train", str(root / "small.jsonl"), *common, "--training.optim.lr", "1e-3", *FAST]
    assert main(["finetune", "classify", "--out", str(root / "alone"), "--epochs", "60", *student]) == 0
    distil = [
        "distill",
        "classify",
        "--teacher",
        str(synthetic["teacher"]),
        "--unlabelled",
        str(root / "unlabelled.txt"),
    ]
    assert main([*distil, "--out", str(root / "distilled"), "--epochs", "5", *student]) == 0
    teacher, alone, distilled = (_test_accuracy(root / n) for n in ("teacher", "alone", "distilled"))
    assert teacher >= 0.9, teacher
    assert distilled >= alone + 0.1, (teacher, alone, distilled)
    run = load_run(root / "distilled")  # a normal classify run
    assert run.task_name == "classify" and run.task.labels == ["neg", "pos"]
    report = json.loads((root / "distilled" / "results.json").read_text())
    assert report["distillation"] == {
        "teacher": str(synthetic["teacher"]),
        "temperature": 2.0,
        "alpha": 0.5,
        "unlabelled": 1200,
    }
    assert f"Distilled from `{synthetic['teacher']}`" in (root / "distilled" / "report.md").read_text()


def test_cached_teacher_logits_resume_and_are_never_mixed(cue_texts, synthetic, tmp_path: Path) -> None:
    from lmforge.runs.distill import teacher_logits
    from lmforge.tasks.distill import DistilledClassification

    rows = DistilledClassification.teacher_rows

    texts = [{"text": ex["text"]} for ex in cue_texts(CHUNK + 10, 6)]
    cache = tmp_path / "teacher"
    teacher_logits(str(synthetic["teacher"]), texts, cache, ["neg", "pos"], rows=rows, progress=False)
    first = (cache / "chunk-00001.safetensors").read_bytes()
    (cache / "chunk-00001.safetensors").unlink()  # a run killed while labelling the second chunk
    stamp = (cache / "chunk-00000.safetensors").stat().st_mtime_ns
    teacher_logits(str(synthetic["teacher"]), texts, cache, ["neg", "pos"], rows=rows, progress=False)
    assert (cache / "chunk-00001.safetensors").read_bytes() == first  # redone, the same numbers
    assert (cache / "chunk-00000.safetensors").stat().st_mtime_ns == stamp  # the finished chunk was kept
    with pytest.raises(UserError, match="differ in"):
        teacher_logits(str(synthetic["teacher"]), texts[:-1], cache, ["neg", "pos"], rows=rows, progress=False)


def test_a_teacher_of_another_task_or_labels_is_refused_before_work(
    cue_texts, synthetic, tmp_path: Path, capsys
) -> None:
    root = synthetic["root"]
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"text": ex["text"], "label": "x" if ex["label"] == "pos" else "y"} for ex in cue_texts(40, 7)])
    args = ["distill", "classify", "--teacher", str(synthetic["teacher"]), "--model", str(synthetic["bert"]), *FAST]
    assert main([*args, "--train", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "are not the training data's" in capsys.readouterr().out
    not_a_teacher = [*args[:3], str(synthetic["bert"]), *args[4:]]  # a pretrained model, not a classify run
    assert main([*not_a_teacher, "--train", str(root / "small.jsonl"), "--out", str(tmp_path / "b")]) == 2
    assert "not a classify run directory" in capsys.readouterr().out
    assert not (tmp_path / "b" / "teacher").exists()


# A synthetic NER task: a person is a "surname" (one of 20 characters) and the character after it. A teacher
# tagged on 600 sentences knows every surname; a student with 10 tagged sentences sees at most 10 of them, and
# learns the rest from the teacher's tag marginals on 600 untagged texts.
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"


def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = list("房间服务酒店干净位置交通早餐价格环境前台设施卫生安静方便不错一般")
    out = []
    for _ in range(n):
        tokens = [rng.choice(pool) for _ in range(rng.randint(6, 12))]
        at = rng.randrange(len(tokens) - 1)
        tokens[at : at + 2] = [rng.choice(SURNAMES), rng.choice(pool)]
        tags = ["O"] * len(tokens)
        tags[at : at + 2] = ["B-PER", "I-PER"]
        out.append({"tokens": tokens, "tags": tags})
    return out


@pytest.fixture(scope="module")
def synthetic_ner(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict:
    from lmforge.data.readers import write_conll

    root = tmp_path_factory.mktemp("distill-ner")
    files = {
        "big": _sentences(600, 11),
        "small": _sentences(10, 12),
        "dev": _sentences(100, 13),
        "test": _sentences(200, 14),
    }
    for name, rows in files.items():
        write_conll(root / f"{name}.conll", rows)
    (root / "unlabelled.txt").write_text(
        "\n".join("".join(ex["tokens"]) for ex in _sentences(600, 15)) + "\n", encoding="utf-8"
    )
    common = ["--model", str(tiny_bert), "--dev", str(root / "dev.conll"), "--test", str(root / "test.conll")]
    teacher = ["finetune", "ner", "--train", str(root / "big.conll"), "--out", str(root / "teacher")]
    assert main([*teacher, *common, "--epochs", "20", "--training.optim.lr", "3e-3", *FAST]) == 0
    return {"root": root, "teacher": root / "teacher", "common": common}


def test_a_distilled_ner_student_beats_the_same_student_alone(synthetic_ner) -> None:
    root, common = synthetic_ner["root"], synthetic_ner["common"]
    student = ["--train", str(root / "small.conll"), *common, "--training.optim.lr", "3e-3", *FAST]
    # the same number of updates (about 380): one batch per epoch alone, 610 / 32 batches per epoch distilled
    assert main(["finetune", "ner", "--out", str(root / "alone"), "--epochs", "380", *student]) == 0
    distil = [
        "distill",
        "ner",
        "--teacher",
        str(synthetic_ner["teacher"]),
        "--unlabelled",
        str(root / "unlabelled.txt"),
    ]
    assert main([*distil, "--out", str(root / "distilled"), "--epochs", "20", *student]) == 0
    f1 = {
        n: json.loads((root / n / "results.json").read_text())["test"]["f1"] for n in ("teacher", "alone", "distilled")
    }
    assert f1["teacher"] >= 0.9, f1
    assert f1["distilled"] >= f1["alone"] + 0.1, f1
    run = load_run(root / "distilled")  # a normal NER run
    assert run.task_name == "ner" and run.task.tags == ["O", "B-PER", "I-PER"]
    report = json.loads((root / "distilled" / "results.json").read_text())
    assert report["distillation"]["unlabelled"] == 600 and report["distillation"]["alpha"] == 0.5


def test_ner_teacher_rows_are_per_token_tag_marginals(synthetic_ner) -> None:
    from lmforge.tasks.distill import read_teacher_rows

    root = synthetic_ner["root"]
    run = load_run(synthetic_ner["teacher"])
    long = {"tokens": list("王一" + "房间服务酒店干净位置交通" * 8)}  # 98 tokens: several windows of 32
    examples = [*_sentences(3, 16), long]
    rows = run.task.tag_log_probs(run.model, examples, device=torch.device("cpu"))
    assert [r.shape for r in rows] == [(len(ex["tokens"]), 3) for ex in examples]
    for r in rows:
        np.testing.assert_allclose(np.exp(r).sum(1), 1.0, atol=1e-4)  # a distribution over tags per token
    viterbi = run.task.predict(run.model, examples, device=torch.device("cpu"))
    agree = np.mean(
        [
            t == run.task.tags[i]
            for r, p in zip(rows, viterbi, strict=True)
            for t, i in zip(p["tags"], r.argmax(1), strict=True)
        ]
    )
    assert agree >= 0.95  # the most probable tag per token is (nearly always) Viterbi's
    unlabelled = [{"tokens": list(line)} for line in (root / "unlabelled.txt").read_text(encoding="utf-8").split()]
    texts = [*_sentences(10, 12), *unlabelled]  # what the distillation run labelled: characters of each line
    cached = read_teacher_rows(root / "distilled", texts, ["O", "B-PER", "I-PER"])
    assert [len(r) for r in cached] == [len(ex["tokens"]) for ex in texts]
    np.testing.assert_allclose(cached[-1], run.task.tag_log_probs(run.model, texts[-1:], device=torch.device("cpu"))[0])
    with pytest.raises(UserError, match="other texts"):
        read_teacher_rows(root / "distilled", texts[:-1], ["O", "B-PER", "I-PER"])


def test_mlm_augment_replaces_about_40_percent_of_chinese_characters_and_nothing_else(tiny_bert: Path) -> None:
    from lmforge.tasks.distill import mlm_augment

    texts = [
        {"text": "房间很干净，服务也不错。Wi-Fi 速度 100M！", "label": "pos"},
        {"text": "价格一般", "label": "neg"},
    ]
    out = mlm_augment(texts * 50, str(tiny_bert), copies=2, seed=3)
    assert len(out) == 200 and all(set(ex) == {"text"} for ex in out)  # labels dropped: the teacher labels them
    assert out == mlm_augment(texts * 50, str(tiny_bert), copies=2, seed=3)  # deterministic
    assert out != mlm_augment(texts * 50, str(tiny_bert), copies=2, seed=4)
    replaced = total = 0
    for i, ex in enumerate(out):
        original = texts[(i // 2) % 2]["text"]
        assert len(ex["text"]) == len(original)
        for a, b in zip(original, ex["text"], strict=True):
            chinese = "\u4e00" <= a <= "\u9fff"
            assert chinese or a == b  # punctuation, Latin letters, digits and spaces stay
            if chinese:
                total += 1
                replaced += a != b
                assert "\u4e00" <= b <= "\u9fff"  # a Chinese character for a Chinese character
    assert 0.3 < replaced / total < 0.5, replaced / total


def test_augmented_ner_sentences_keep_their_tokens_aligned_and_are_made_once(synthetic_ner, tmp_path: Path) -> None:
    from lmforge.runs.config import DistillNERConfig
    from lmforge.tasks.distill import AUGMENTED, TEACHER_DIR, distill_examples

    train = _sentences(10, 12)
    cfg = DistillNERConfig(out=str(tmp_path), model=synthetic_ner["common"][1], teacher="t", augment=3)
    labelled, unlabelled = distill_examples(cfg.task_settings(), train, tmp_path)
    assert labelled == train and len(unlabelled) == 30
    assert [len(ex["tokens"]) for ex in unlabelled] == [len(ex["tokens"]) for ex in train for _ in range(3)]
    path = tmp_path / TEACHER_DIR / AUGMENTED
    stamp = path.stat().st_mtime_ns
    assert (
        distill_examples(cfg.task_settings(), train, tmp_path)[1] == unlabelled and path.stat().st_mtime_ns == stamp
    )  # reused
    cfg.training.seed += 1  # other settings: made again
    assert distill_examples(cfg.task_settings(), train, tmp_path)[1] != unlabelled and path.stat().st_mtime_ns != stamp
