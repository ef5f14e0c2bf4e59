"""Language-model tasks (evals/tasks.py, evals/run.py) and ``lmforge evaluate --task``: metrics by their
definitions, the built-in tasks built from their data, k-shot draws, and one clear error per bad input."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.evals.run import chat_messages, choice_scores, draw_shots, fit_shots, plain_prompt, shot_examples
from lmforge.evals.tasks import BUILTIN_EVALS, ChoiceItem, GenerationItem, load_task, mean_and_stderr, read_task_file
from tests.commands.test_bad_inputs import _fails

ROWS = [
    {"question": "中国的首都是哪里？", "choices": ["北京", "上海", "广州", "深圳"], "answer": 0},
    {"question": "一年有几个月？", "choices": ["十个", "十二个", "十五个"], "answer": "B"},
    {"question": "What colour is a clear sky?", "choices": ["green", "blue"], "answer": 1},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def synthetic_tatoeba(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """2,100 made-up pairs in Tatoeba's TSV shape: 1,000 test, 1,000 dev and 100 train pairs."""
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"Sentence number {i}.\t第{i}句话。\n" for i in range(2100)), encoding="utf-8")
    monkeypatch.setenv("LMFORGE_TATOEBA", str(tsv))
    return tsv


def test_acc_and_acc_norm_follow_the_harness_definitions() -> None:
    items = [ChoiceItem("q", ("a", "bbbb"), 1), ChoiceItem("q", ("aa", "b"), 0), ChoiceItem("q", ("x", "y"), 1)]
    lls = [[-3.0, -4.0], [-2.0, -1.0], [-1.0, -1.0]]
    acc, acc_norm = choice_scores(items, lls)
    assert acc == [0.0, 0.0, 0.0]  # -3 > -4; -1 > -2; a tie goes to the first choice
    assert acc_norm == [1.0, 1.0, 0.0]  # -4/4 > -3/1; -2/2 == -1/1: the first; the tie again


def test_the_standard_error_is_the_sample_deviation_over_root_n() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, err = mean_and_stderr(values)
    assert mean == 0.6 and err == pytest.approx(statistics.stdev(values) / math.sqrt(5))


def test_a_choice_file_reads_letters_and_indices(tmp_path: Path) -> None:
    task = read_task_file(_jsonl(tmp_path / "mc.jsonl", ROWS))
    assert task.kind == "choice" and [i.answer for i in task.items] == [0, 1, 1]
    first = task.items[0]
    assert first.context == "中国的首都是哪里？\nA. 北京\nB. 上海\nC. 广州\nD. 深圳\n答案："
    assert first.choices == ("A", "B", "C", "D") and first.delimiter == " "
    assert task.items[2].context.endswith("\nAnswer:")
    text = read_task_file(tmp_path / "mc.jsonl", choice_format="text")
    assert text.items[1].choices == ("十个", "十二个", "十五个") and text.items[1].context == "一年有几个月？\n答案："


def test_k_shots_are_other_rows_drawn_with_the_seed(tmp_path: Path) -> None:
    task = read_task_file(_jsonl(tmp_path / "mc.jsonl", ROWS))
    prefixes = shot_examples(task, task.items, 2, seed=7)
    assert prefixes == shot_examples(task, task.items, 2, seed=7)
    for row, prefix in enumerate(prefixes):
        shots = prefix.split("\n\n")[:-1]
        assert len(shots) == 2 and task.items[row].context not in prefix
        for shot in shots:  # each shot is another row's context with its right answer
            other = next(i for i in task.items if shot.startswith(i.context))
            assert shot == other.context + " " + other.choices[other.answer]


def test_generation_shots_precede_the_prompt_as_text_or_as_earlier_turns(tmp_path: Path) -> None:
    rows = [{"prompt": f"翻译：第{i}句", "reference": f"Sentence {i}."} for i in range(6)]
    task = read_task_file(_jsonl(tmp_path / "gen.jsonl", rows))
    drawn = draw_shots(task, len(task.items), 2, seed=3)
    assert drawn == draw_shots(task, len(task.items), 2, seed=3)
    for row, (item, shots) in enumerate(zip(task.items, drawn, strict=True)):
        assert len(shots) == 2 and item not in shots and all(s in task.items for s in shots)
        first, second = shots
        text = f"{first.prompt}\n{first.reference}\n\n{second.prompt}\n{second.reference}\n\n{item.prompt}\n"
        assert plain_prompt(item, shots) == text, row
        turns = chat_messages(item, shots)
        assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user"]
        contents = [first.prompt, first.reference, second.prompt, second.reference, item.prompt]
        assert [m["content"] for m in turns] == contents


def test_shots_that_do_not_fit_are_dropped_whole_the_oldest_first() -> None:
    shots = [GenerationItem(f"p{i}", f"r{i}") for i in range(4)]
    seen = []

    def render(kept: list) -> list[int]:  # 10 tokens a shot, 5 for the row itself
        seen.append([s.prompt for s in kept])
        return [0] * (10 * len(kept) + 5)

    assert fit_shots(render, shots, 26) == ([0] * 25, 2)
    assert seen[-1] == ["p2", "p3"]  # the two most recent shots kept
    assert fit_shots(render, shots, 100) == ([0] * 45, 0)
    assert fit_shots(render, shots, 4) == (None, 4)


def test_the_translation_tasks_draw_their_shots_from_the_dev_split(synthetic_tatoeba: Path) -> None:
    from lmforge.data.builtin import tatoeba_cmn_en

    splits = tatoeba_cmn_en()
    for name, source, target in (("tatoeba-zh-en", "zh", "en"), ("tatoeba-en-zh", "en", "zh")):
        task = load_task(name)
        assert [i.reference for i in task.items] == [p[target] for p in splits["test"]]
        assert [s.reference for s in task.shots] == [p[target] for p in splits["dev"]]
        assert all(p[source] in s.prompt for s, p in zip(task.shots, splits["dev"], strict=True))


def test_a_built_in_task_is_of_the_kind_it_declares(synthetic_tatoeba: Path) -> None:
    """BuiltinEval.kind refuses a task before its data is read: it must be the kind the built task has (the tasks
    whose data the tests have: Tatoeba, the reviews, People's Daily, chatterbot)."""
    from lmforge.evals.tasks import BUILTIN_EVALS

    built = [n for n in BUILTIN_EVALS if not n.startswith("tang-")]
    assert len(built) == 6
    for name in built:
        assert load_task(name).kind == BUILTIN_EVALS[name].kind, name


def test_the_sentiment_task_is_the_test_reviews_with_their_label_words() -> None:
    from lmforge.data.builtin import reviews_sentiment

    task = load_task("reviews-sentiment-prompt")
    test = reviews_sentiment()["test"]
    assert len(task.items) == len(test) and task.shots
    for item, example in zip(task.items[:50], test[:50], strict=True):
        assert item.context == f"评论：{example['text']}\n情感："
        assert item.choices[item.answer] == {"pos": "正面", "neg": "负面"}[example["label"]]


def test_tang_next_line_offers_the_true_line_among_four_of_its_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.data import builtin
    from lmforge.data.poems import TANG_FILE

    chars = "春夏秋冬山水风月花鸟云雨江河日夜"
    lines = [(chars * 2)[i : i + 5] for i in range(16)]  # 16 distinct 5-character lines
    poems = []
    for i, (a, b, c, d) in enumerate(random.Random(0).sample(list(itertools.permutations(lines, 4)), 200)):
        poems.append({"title": f"诗{i}", "author": "某", "body": f"{a}，{b}。{c}，{d}。"})
    (tmp_path / TANG_FILE).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in poems), "utf-8")
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))
    builtin.tang_poems.cache_clear()
    builtin.tang_verse.cache_clear()
    try:
        task = load_task("tang-next-line")
        test = builtin.tang_verse()["test"]
    finally:
        builtin.tang_poems.cache_clear()
        builtin.tang_verse.cache_clear()
    assert len(task.items) == len(test) >= 10
    for item, poem in zip(task.items, test, strict=True):
        first, second = poem["body"].split("。")[0].split("，")
        assert item.context == f"{poem['title']}\n{first}，"
        assert item.choices[item.answer] == second + "。"
        assert len(set(item.choices)) == 4 and {len(c) for c in item.choices} == {6}


def test_perplexity_of_a_text_file_is_its_mean_token_loss(chat_gpt: Path, tmp_path: Path, capsys) -> None:
    from lmforge.rundir import load_run

    text = "这家酒店的位置很好，房间干净，早餐丰富。"
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["evaluate", "--model", str(chat_gpt), "--task", str(tmp_path / "doc.txt"), "--output", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    run = load_run(chat_gpt)
    tok = run.task.tokenizer
    ids = torch.tensor([[tok.token_id("bos") or tok.token_id("eos"), *tok.encode(text, special_tokens=False)]])
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(run.model(ids[:, :-1])[0], ids[0, 1:])
    assert result["tokens"] == ids.shape[1] - 1 and result["characters"] == len(text)
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert result["perplexity_per_char"] == pytest.approx(math.exp(loss.item() * result["tokens"] / len(text)), 1e-4)
    assert "perplexity" in capsys.readouterr().out


def test_a_choice_file_is_scored_end_to_end(chat_gpt: Path, tmp_path: Path) -> None:
    rows = _jsonl(tmp_path / "mc.jsonl", ROWS * 4)
    out = tmp_path / "mc.json"
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(rows), "--shots", "2", "--output", str(out)]
    assert main(args) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["rows"] == 12 and result["shots"] == 2 and 0.0 <= result["acc"] <= 1.0
    assert result["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3)


@pytest.mark.parametrize("template", ["on", "off"])
def test_a_generation_file_is_decoded_and_scored(chat_gpt: Path, tmp_path: Path, template: str) -> None:
    rows = _jsonl(tmp_path / "gen.jsonl", [{"prompt": "把下面的中文翻译成英文：\n你好", "reference": "Hello."}] * 3)
    out = tmp_path / "gen.json"
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(rows), "--max-new-tokens", "12", "--output", str(out)]
    assert main([*args, "--chat-template", template]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["chat_template"] is (template == "on") and result["rows"] == 3 and result["exact_match"] == 0.0
    assert len(result["samples"]) == 3 and 0.0 <= result["chrf"] <= 100.0
    if template == "off":  # plain continuation stops at the end of the line
        assert all("\n" not in s["output"] for s in result["samples"])


@pytest.mark.parametrize("template", ["on", "off"])
def test_k_shot_generation_drops_shots_that_do_not_fit_the_window(
    chat_gpt: Path, tmp_path: Path, caplog, template: str
) -> None:
    rows = [{"prompt": f"翻译成英文：我有{n}本书", "reference": f"I have {n} books."} for n in "一二三四五六"]
    path = _jsonl(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "gen.json"
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(path), "--shots", "3", "--max-new-tokens", "8"]
    assert main([*args, "--chat-template", template, "--output", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["shots"] == 3 and result["rows"] == 6 and result["prompts_cut"] == 0
    # a row with its shots is ~20 byte-level tokens per example (more in the chat template): 56 tokens hold fewer
    assert 0 < result["shots_dropped"] <= 3 * 6
    assert f"{result['shots_dropped']} shots dropped (the oldest first) to fit prompts in 56 tokens" in caplog.text


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "choices": ["only"], "answer": 0}, "has 1 item; a choice needs at least 2"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer' 2 is not an index 0..1 or a letter A..B"),
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "'answer' 'C' is not an index 0..1"),
        ({"question": "q", "choices": ["a", ""], "answer": 0}, "'choices' must be a list of non-empty strings"),
        ({"question": "q", "answer": 0}, "none of the task shapes"),
    ],
)
def test_a_bad_choice_row_is_refused_with_its_line(
    chat_gpt: Path, tmp_path: Path, capsys, row: dict, message: str
) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    _fails(capsys, ["evaluate", "--model", str(chat_gpt), "--task", str(path)], f"{path}:2:", message)


def test_more_shots_than_the_pool_holds_are_refused(chat_gpt: Path, tmp_path: Path, capsys) -> None:
    path = _jsonl(tmp_path / "mc.jsonl", ROWS)
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(path), "--shots", "3"]
    _fails(capsys, args, "--shots 3", "has only 2 examples in the file's other rows")


def test_an_encoder_is_refused_for_language_model_tasks(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "doc.txt").write_text("文本", encoding="utf-8")
    args = ["evaluate", "--model", str(tiny_bert), "--task", str(tmp_path / "doc.txt")]
    _fails(capsys, args, "language-model tasks score a decoder", "this is a bert model")


def test_exactly_one_of_data_task_and_suite(chat_gpt: Path, capsys) -> None:
    _fails(capsys, ["evaluate", "--model", str(chat_gpt)], "give exactly one of --data", "got none")
    args = ["evaluate", "--model", str(chat_gpt), "--suite", "--task", "x.jsonl"]
    _fails(capsys, args, "got --task and --suite")


def test_an_unknown_task_lists_the_built_in_ones(chat_gpt: Path, capsys) -> None:
    _fails(capsys, ["evaluate", "--model", str(chat_gpt), "--task", "hellaswag"], "tang-next-line", "neither a file")


def test_a_request_longer_than_the_window_says_how_it_is_cut(chat_gpt: Path, tmp_path: Path, caplog) -> None:
    question = "这家酒店的位置很好，房间干净，早餐丰富，服务员热情。" * 3
    long = {"question": question, "choices": ["好", "坏"], "answer": 0}
    path = _jsonl(tmp_path / "long.jsonl", [long, ROWS[2]])
    out = tmp_path / "long.json"
    assert main(["evaluate", "--model", str(chat_gpt), "--task", str(path), "--output", str(out)]) == 0
    assert "2 of 4 context + choice requests are longer than the 64-token window" in caplog.text
    assert "cut from the left" in caplog.text
    assert json.loads(out.read_text())["results"][0]["contexts_cut"] == 2


def test_a_window_beyond_the_model_is_refused(chat_gpt: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "doc.txt").write_text("文本", encoding="utf-8")
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(tmp_path / "doc.txt"), "--window", "65"]
    _fails(capsys, args, "--window 65: must be 2..64")


def test_shots_for_perplexity_alone_are_refused(chat_gpt: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "doc.txt").write_text("文本", encoding="utf-8")
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(tmp_path / "doc.txt"), "--shots", "1"]
    _fails(capsys, args, "--shots 1: k-shot examples are for choice and generation tasks; none of doc.txt")


def test_a_built_in_task_without_its_data_says_which_and_how(
    chat_gpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from lmforge.data import builtin

    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))
    builtin.tang_poems.cache_clear()
    builtin.tang_verse.cache_clear()
    try:
        args = ["evaluate", "--model", str(chat_gpt), "--task", "tang-next-line"]
        _fails(capsys, args, "task tang-next-line: tang-poems is not fetched yet", "lmforge data fetch tang-poems")
        # --suite scores what it can and says what it skipped (a fresh clone has not fetched the poems)
        out = tmp_path / "suite.json"
        suite = ["evaluate", "--model", str(chat_gpt), "--suite", "--limit", "2", "--output", str(out)]
        _fails(capsys, suite, "--max-new-tokens 64: leaves no room for tatoeba-zh-en's prompts in the 64-token window")
        assert not out.exists()  # refused before any task was scored
        assert main([*suite, "--max-new-tokens", "8"]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert "skipped tang-next-line: tang-poems is not fetched yet (`lmforge data fetch tang-poems`)" in said
        written = json.loads(out.read_text(encoding="utf-8"))
        fetched = [name for name, b in BUILTIN_EVALS.items() if b.fetch is None]
        assert [r["task"] for r in written["results"]] == fetched and len(fetched) == len(BUILTIN_EVALS) - 2
        assert written["skipped"] == {n: "tang-poems is not fetched" for n in ("tang-next-line", "tang-verse:test")}
    finally:
        builtin.tang_poems.cache_clear()
        builtin.tang_verse.cache_clear()


def test_a_shots_file_without_shots_is_refused(chat_gpt: Path, tmp_path: Path, capsys) -> None:
    path = _jsonl(tmp_path / "mc.jsonl", ROWS)
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(path), "--shots-file", str(path)]
    _fails(capsys, args, "give --shots K, the number of shots to draw from it")


def test_a_shots_file_of_another_kind_is_refused(chat_gpt: Path, tmp_path: Path, capsys) -> None:
    choice = _jsonl(tmp_path / "mc.jsonl", ROWS)
    generation = _jsonl(tmp_path / "gen.jsonl", [{"prompt": "你好", "reference": "Hello."}])
    args = ["evaluate", "--model", str(chat_gpt), "--task", str(choice), "--shots", "1"]
    args += ["--shots-file", str(generation)]
    _fails(capsys, args, f"--shots-file {generation}: generation rows", "mc.jsonl is a choice task")


def test_a_translator_chooses_the_candidate_it_gives_the_highest_likelihood(
    tiny_translator: Path, synthetic_tatoeba: Path, tmp_path: Path
) -> None:
    from lmforge.rundir import load_run

    out = tmp_path / "mt.json"
    args = ["evaluate", "--model", str(tiny_translator), "--suite", "--limit", "6", "--output", str(out)]
    assert main(args) == 0
    choice, generation = json.loads(out.read_text())["results"]
    assert (choice["task"], generation["task"]) == ("tatoeba-zh-en-choice", "tatoeba-zh-en")
    run, items = load_run(tiny_translator), load_task("tatoeba-zh-en-choice").items[:6]
    acc, acc_norm = [], []
    for item in items:  # each candidate alone, unpadded: log p(its tokens, then the end token | the source)
        lls = []
        for candidate in item.choices:
            ((src, tgt),) = run.task.encode([{"src": item.source, "tgt": candidate}], split="check")
            decoder_in = torch.tensor([[run.task.eos_id, *tgt]])
            with torch.inference_mode():
                logits = run.model(torch.as_tensor(src, dtype=torch.long)[None], decoder_in)[0]
            labels = torch.tensor([*tgt, run.task.eos_id])
            lls.append(torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).sum().item())
        best = max(range(len(lls)), key=lls.__getitem__)
        normed = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
        acc.append(float(best == item.answer))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == item.answer))
    assert choice["acc"] == pytest.approx(sum(acc) / 6) and choice["acc_norm"] == pytest.approx(sum(acc_norm) / 6)
    sources = [item.source for item in load_task("tatoeba-zh-en").items[:5]]
    greedy = run.task.translate(run.model, sources, device=torch.device("cpu"))
    assert [s["output"] for s in generation["samples"]] == greedy
    assert generation["rows"] == 6 and generation["chat_template"] is False


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "tang-verse:test"], "a perplexity task; an encoder-decoder (zh -> en) is scored on translation"),
        (["--task", "tatoeba-en-zh"], "--task tatoeba-en-zh: translates en -> zh; this model translates zh -> en"),
        (["--task", "tatoeba-zh-en", "--shots", "2"], "--shots 2: an encoder-decoder reads the source sentence alone"),
    ],
)
def test_a_translator_is_refused_what_it_cannot_be_scored_on(
    tiny_translator: Path, synthetic_tatoeba: Path, capsys, flags: list[str], message: str
) -> None:
    _fails(capsys, ["evaluate", "--model", str(tiny_translator), *flags], message)
