"""tang-poems (data/poems.py): the conversion of a committed sample of the npm package, simplified characters on
known cases, the poem-form metric against hand-labelled poems, and the built-in's message before fetching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.poems import clean_body, convert, poem_form, poem_text, read_tang
from lmforge.errors import UserError

SAMPLE = Path(__file__).parents[1] / "fixtures" / "chinese-poetry-sample"


def test_conversion_of_the_committed_sample() -> None:
    raw = json.loads((SAMPLE / "dist" / "quantangshi" / "poet.tang.0.json").read_text(encoding="utf-8"))
    poems = convert(SAMPLE)
    # 31 poems: 24 clean, 6 with missing characters (□), 1 duplicate body under another author
    assert len(raw) == 31 and len(poems) == 24
    first = poems[0]
    assert first == {
        "title": "帝京篇十首 一",
        "author": "太宗皇帝",
        "body": "秦川雄帝宅，函谷壮皇居。绮殿千寻起，离宫百雉余。连甍遥接汉，飞观迥凌虚。云日隐层阙，风烟出绮疎。",
    }
    assert poem_text(first) == "帝京篇十首 一\n" + first["body"]
    assert len({p["body"] for p in poems}) == len(poems)
    assert all(clean_body([p["body"]]) == p["body"] for p in poems)


@pytest.mark.parametrize(
    ("traditional", "simplified"),
    [
        ("牀前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
        ("綺殿千尋起，離宮百雉餘。", "绮殿千寻起，离宫百雉余。"),
        ("國破山河在，城春草木深。", "国破山河在，城春草木深。"),
    ],
)
def test_traditional_characters_become_simplified(traditional: str, simplified: str, tmp_path: Path) -> None:
    quantangshi = tmp_path / "dist" / "quantangshi"
    quantangshi.mkdir(parents=True)
    row = {"author": "李白", "title": "靜夜思", "paragraphs": [traditional]}
    (quantangshi / "poet.tang.0.json").write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    (poem,) = convert(tmp_path)
    assert poem["body"] == simplified and poem["title"] == "静夜思"


def test_notes_are_dropped_and_damaged_poems_left_out() -> None:
    assert clean_body(["白日依山盡（一作近），黃河入海流。"]) == "白日依山盡，黃河入海流。"
    assert clean_body(["□□□□□，黃河入海流。"]) is None
    assert clean_body(["白日依山盡,黃河入海流."]) is None  # ASCII punctuation is not the text's own
    assert clean_body([]) is None


# hand-labelled: (body, expected form)
LABELLED = [
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡。", 5),  # a five-character quatrain
    ("朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。", 7),  # seven-character quatrain
    ("国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。", 5),
    ("好雨知时节，当春乃发生。随风潜入夜，润物细无声！", 5),  # "!" may end a couplet
    ("床前明月光，疑是地上霜。", None),  # one couplet only
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡", None),  # the last line has no punctuation
    ("床前明月光。疑是地上霜，举头望明月，低头思故乡。", None),  # punctuation out of place
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡乡。", None),  # a six-character line
    ("朝辞白帝彩云间，千里江陵一日还。举头望明月，低头思故乡。", None),  # 7 and 5 mixed
    ("浪宕从来水郭间，高歌欹枕看遥山。红蓼岸，白苹湾，肯被兰桡使不闲。", None),  # a song form (3 + 3)
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡。举头望明月，", None),  # an odd number of lines
    ("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", None),  # a character that is no line of verse
    ("床前明月a，疑是地上霜。举头望明月，低头思故乡。", None),
]


@pytest.mark.parametrize(("body", "form"), LABELLED)
def test_poem_form_against_hand_labels(body: str, form: int | None) -> None:
    assert poem_form(body) == form


def test_the_builtin_says_how_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))
    with pytest.raises(UserError, match="lmforge data fetch tang-poems"):
        read_tang()
    from lmforge.data.readers import write_jsonl

    write_jsonl(tmp_path / "tang-poems.jsonl", convert(SAMPLE))
    poems = read_tang()
    assert len(poems) == 24 and poems[0]["text"].startswith("帝京篇十首 一\n秦川雄帝宅")


def test_tang_verse_is_the_regulated_verse_of_tang_poems_in_its_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.data import builtin
    from lmforge.data.readers import write_jsonl

    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))
    write_jsonl(tmp_path / "tang-poems.jsonl", convert(SAMPLE))
    builtin.tang_poems.cache_clear()
    builtin.tang_verse.cache_clear()
    try:
        poems, verse = builtin.load_builtin("tang-poems"), builtin.load_builtin("tang-verse")
    finally:
        builtin.tang_poems.cache_clear()
        builtin.tang_verse.cache_clear()
    everything = [p for split in poems.values() for p in split]
    regulated = [p for p in everything if poem_form(p["body"]) is not None]
    assert 0 < len(regulated) < len(everything)  # the sample has irregular poems too
    for split in ("train", "dev", "test"):
        assert verse[split] == [p for p in poems[split] if poem_form(p["body"]) is not None]
    assert sum(len(v) for v in verse.values()) == len(regulated)
