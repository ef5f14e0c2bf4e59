"""Labelled files: every format users bring, and bad rows named by file:line or skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.readers import read_labelled
from lmforge.errors import UserError


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_csv_tsv_and_jsonl_read_the_same_examples(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, "a.csv", 'text,text_pair,label\n"好,很好",,pos\n差评,还行,neg\n')
    tsv_path = _write(tmp_path, "a.tsv", "label\ttext\ttext_pair\npos\t好,很好\t\nneg\t差评\t还行\n")
    jsonl_path = _write(
        tmp_path,
        "a.jsonl",
        '{"text": "好,很好", "label": "pos"}\n\n{"text": "差评", "text_pair": "还行", "label": "neg"}\n',
    )
    expected = [{"text": "好,很好", "label": "pos"}, {"text": "差评", "label": "neg", "text_pair": "还行"}]
    for path in (csv_path, tsv_path, jsonl_path):
        examples, report = read_labelled(path)
        assert [{k: v for k, v in ex.items() if k != "source"} for ex in examples] == expected, path
        lines = [2, 3] if path != jsonl_path else [1, 3]
        assert [ex["source"] for ex in examples] == [f"{path}:{n}" for n in lines]
        assert report.kept == 2 and report.skipped == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("b.jsonl", '{"text": "ok", "label": "pos"}\n{"text": "x", "label": "pos"\n', "b.jsonl:2: malformed JSON"),
        ("b.jsonl", '{"text": "ok", "label": "pos"}\n{"text": "ok"}\n', "b.jsonl:2: missing field 'label'"),
        ("b.jsonl", '{"text": "   ", "label": "pos"}\n', "b.jsonl:1: empty text"),
        ("b.csv", "text,label\nfine,pos\ntoo,many,columns\n", "b.csv:3: 3 columns where the header has 2"),
        ("b.csv", "words,label\nx,pos\n", "b.csv:1: header has columns"),
        ("b.tsv", b"text\tlabel\nok\tpos\nbad \xff\tneg\n", "b.tsv:3: undecodable bytes"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_labelled(_write(tmp_path, name, content))


def test_skip_bad_rows_keeps_the_rest_and_counts(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "c.jsonl",
        '{"text": "a", "label": "x"}\nnot json\n{"text": "", "label": "y"}\n{"text": "b", "label": "y"}\n',
    )
    examples, report = read_labelled(path, skip_bad_rows=True)
    assert [e["text"] for e in examples] == ["a", "b"]
    assert report.kept == 2 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}:2:") and report.skipped[1].startswith(f"{path}:3:")


def test_unknown_extension_says_what_is_supported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=".csv, .tsv or .jsonl"):
        read_labelled(_write(tmp_path, "d.xlsx", "x"))


def test_read_tagged_conll_and_jsonl(tmp_path: Path) -> None:
    from lmforge.data.readers import read_tagged

    conll = _write(tmp_path, "a.conll", "北 B-LOC\n京 I-LOC\n\n\n是 O\n好 O\n")
    examples, _ = read_tagged(conll)
    assert [ex["tokens"] for ex in examples] == [["北", "京"], ["是", "好"]]
    assert [ex["source"] for ex in examples] == [f"{conll}:1", f"{conll}:5"]
    jsonl = _write(tmp_path, "a.jsonl", '{"tokens": ["北", "京"], "tags": ["B-LOC", "I-LOC"]}\n')
    assert read_tagged(jsonl)[0][0]["tags"] == ["B-LOC", "I-LOC"]


def test_entities_that_begin_with_i_are_read_as_iob2_and_the_report_says_so(tmp_path: Path) -> None:
    """IOB1 / IO files (every entity tagged I-) used to vanish under strict IOB2 scoring: F1 0 on a model that
    could not learn them. Each I- that does not continue its own type starts an entity; BIOES is untouched."""
    from lmforge.data.readers import iob1_to_iob2, read_tagged

    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "I-ORG", "B-ORG"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-ORG"
    ]  # fmt: skip
    examples, report = read_tagged(_write(tmp_path, "io.conll", "北 I-LOC\n京 I-LOC\n\n江 I-PER\n是 O\n"))
    assert [ex["tags"] for ex in examples] == [["B-LOC", "I-LOC"], ["B-PER", "O"]]
    assert report.notes == [f"{tmp_path / 'io.conll'}: 2 entities began with I- (the IOB1 or IO scheme); "
                            "read as IOB2, with B- at each entity's start"]  # fmt: skip
    examples, report = read_tagged(_write(tmp_path, "bio.conll", "北 B-LOC\n京 I-LOC\n"))
    assert examples[0]["tags"] == ["B-LOC", "I-LOC"] and report.notes == []
    examples, report = read_tagged(_write(tmp_path, "bioes.conll", "北 S-LOC\n京 I-LOC\n"))
    assert examples[0]["tags"] == ["S-LOC", "I-LOC"] and report.notes == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("北 B-LOC\n京\n", r"a\.conll:1: line 2: expected 'TOKEN TAG'"),
        ("北 B-LOC\n\n京 LOC\n", r"a\.conll:3: tag 'LOC' is not 'O' or B-/I-/E-/S-"),
    ],
)
def test_read_tagged_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    from lmforge.data.readers import read_tagged

    path = _write(tmp_path, "a.conll", content)
    with pytest.raises(ValueError, match=message):
        read_tagged(path)
    examples, report = read_tagged(path, skip_bad_rows=True)
    assert len(report.skipped) == 1 and report.kept == len(examples)


def test_whole_number_labels_are_one_label_however_they_are_written(tmp_path: Path) -> None:
    """JSON's 1 and 1.0 (and a CSV's "1.0") are one class; text such as "007" is kept as written."""
    path = tmp_path / "numbers.jsonl"
    rows = ['{"text": "a", "label": 1}', '{"text": "b", "label": 1.0}', '{"text": "c", "label": 0}']
    rows += ['{"text": "d", "label": 0.0}', '{"text": "e", "label": "1.0"}', '{"text": "f", "label": "007"}']
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    examples, _ = read_labelled(path)
    assert [ex["label"] for ex in examples] == ["1", "1", "0", "0", "1", "007"]


@pytest.mark.parametrize(
    ("reader", "row"),
    [
        ("read_labelled", '{"text": "bad \\ud800", "label": "neg"}'),
        ("read_tagged", '{"tokens": ["a", "\\udc00"], "tags": ["O", "O"]}'),
        ("read_conversations", '{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
    ],
)
def test_a_lone_surrogate_in_a_jsonl_file_is_named_by_file_and_line(tmp_path: Path, reader: str, row: str) -> None:
    """JSON's escapes can spell half a UTF-16 pair, which no tokenizer reads: every reader refuses it at file:line
    (the server answers the same text with a 422), and --skip-bad-rows skips it."""
    from lmforge.data import readers

    path = tmp_path / "rows.jsonl"
    path.write_text(row + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.jsonl:1: .*lone surrogate"):
        getattr(readers, reader)(path)


def test_alpaca_rows_are_read_as_conversations(tmp_path) -> None:
    """{"instruction", "input", "output"} rows become a user turn (instruction, blank line, input) and the reply; the
    report says so; a row missing its output is named with its line."""
    from lmforge.data.readers import read_conversations

    rows = [
        {"instruction": "把这句话翻译成英文。", "input": "我爱你", "output": "I love you."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Be brief."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    examples, report = read_conversations(path)
    assert [e["messages"] for e in examples] == [
        [
            {"role": "user", "content": "把这句话翻译成英文。\n\n我爱你"},
            {"role": "assistant", "content": "I love you."},
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        rows[2]["messages"],
    ]
    assert any("2 Alpaca-style rows" in note for note in report.notes)
    path.write_text(json.dumps({"instruction": "x", "input": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"sft.jsonl:1.*'instruction' and 'output'"):
        read_conversations(path)
