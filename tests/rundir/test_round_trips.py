"""Every entry of TASKS trains through its recipe and comes back through ``load_run``.

Fine-tuning tasks: a tiny fine-tune, then ``load_run`` gives the same task with the weights of the chosen
checkpoint, and ``predict`` answers. Pretraining objectives: a tiny pretraining, whose model directory
``load_run`` serves (a BERT as an embedder, a GPT as a generation model) with the chosen weights.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_conll, write_jsonl
from lmforge.models.registry import read_safetensors
from lmforge.rundir import load_run
from lmforge.tasks import TASKS

GENERATION = Path(__file__).parents[1] / "fixtures" / "generation"
SAMPLE = Path(__file__).parents[1] / "fixtures" / "tatoeba-sample.tsv"
LOOP = [
    "--epochs",
    "0",
    "--training.max-steps",
    "2",
    "--training.eval-every",
    "0",
    "--training.global-batch-size",
    "8",
    "--training.micro-batch-size",
    "8",
    "--training.no-progress",
    "--training.peak-tflops",
    "1",
]


def _files(root: Path, tiny_mt: list[str]) -> dict[str, list[str]]:
    """The fine-tuning command of each task on tiny real data."""
    write_jsonl(root / "reviews.jsonl", load_builtin("reviews-sentiment")["train"][:32])
    write_conll(root / "ner.conll", load_builtin("peoples-daily-ner")["train"][:32])
    chats = load_builtin("chatterbot-zh")["train"][:32]
    write_jsonl(root / "chat.jsonl", chats)
    replies = [c["messages"][-1]["content"] for c in chats]
    pairs = [  # each prompt's own reply preferred to the next conversation's
        {"messages": c["messages"][:-1], "chosen": reply, "rejected": replies[(i + 1) % len(chats)]}
        for i, (c, reply) in enumerate(zip(chats, replies, strict=True))
        if reply != replies[(i + 1) % len(chats)]
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    lines = SAMPLE.read_text(encoding="utf-8-sig").splitlines()[:32]
    (root / "pairs.tsv").write_text("".join(f"{ln.split(chr(9))[1]}\t{ln.split(chr(9))[0]}\n" for ln in lines))
    return {
        "classify": ["--train", str(root / "reviews.jsonl"), "--max-len", "32"],
        "ner": ["--train", str(root / "ner.conll"), "--max-len", "32"],
        "embed": ["--train", str(root / "reviews.jsonl"), "--max-len", "32"],
        "chat": ["--model", str(GENERATION / "gpt"), "--train", str(root / "chat.jsonl")],
        "dpo": ["--model", str(GENERATION / "gpt"), "--train", str(root / "pairs.jsonl")],
        "orpo": ["--model", str(GENERATION / "gpt"), "--train", str(root / "pairs.jsonl")],
        "translate": ["--train", str(root / "pairs.tsv"), "--max-len", "24", *tiny_mt],
    }


def _examples(task: str) -> list[dict]:
    if task == "chat":
        return load_builtin("chatterbot-zh")["dev"][:2]
    if task == "translate":
        return [{"src": "我会游泳。"}, {"src": "你好吗？"}]
    return [{"text": "质量很好，很满意"}, {"text": "太差了"}]


def _chosen_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    import json

    results = json.loads((run_dir / "results.json").read_text())
    weights = results.get("weights") or results["model_weights"]  # fine-tuning, pretraining
    return read_safetensors(run_dir / weights / "model.safetensors")


@pytest.mark.parametrize("task", [n for n, e in TASKS.items() if e.kind == "finetune"])
def test_every_fine_tuning_task_round_trips(
    task: str, tmp_path: Path, tiny_bert: Path, tiny_seq2seq_flags: list[str]
) -> None:
    entry = TASKS[task]
    files = _files(tmp_path, [*tiny_seq2seq_flags, "--vocab-size", "300", "--num-beams", "1"])
    args = files.get(task) or files[entry.saves_as]
    model = [] if "--model" in args else ["--model", str(tiny_bert)]
    out = tmp_path / "run"
    command = entry.command_name.split()
    if "teacher" in {f.name for f in fields(entry.load_config())}:  # distillation: a run of the task it writes
        teacher = tmp_path / "teacher"
        assert main(["finetune", entry.saves_as, *model, *args, "--out", str(teacher), *LOOP]) == 0
        command += ["--teacher", str(teacher)]
    assert main([*command, *model, *args, "--out", str(out), *LOOP]) == 0
    run = load_run(out)
    written = entry.saves_as or task
    assert run.task_name == written and run.finetuned and isinstance(run.task, TASKS[written].load())
    state, chosen = run.model.state_dict(), _chosen_weights(out)
    assert set(state) == set(chosen)
    for name, tensor in chosen.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
    predictions = run.task.predict(run.model, _examples(written), device=torch.device("cpu"))
    assert len(predictions) == 2 and all(isinstance(p, dict) and p for p in predictions)


@pytest.mark.parametrize("task", [n for n, e in TASKS.items() if e.kind == "pretrain"])
def test_every_pretraining_objective_round_trips(
    task: str, tmp_path: Path, review_corpus: Path, review_wordpiece: Path, review_bpe: Path
) -> None:
    gpt = TASKS[task].model == "gpt"
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--out",
        str(out),
        "--task",
        task,
        "--data.input",
        str(review_corpus),
        "--data.tokenizer",
        str(review_bpe if gpt else review_wordpiece),
        "--data.seq-len",
        "32",
        "--model.size",
        "gpt-tiny" if gpt else "bert-tiny",
        "--model.n-layers",
        "1",
        "--model.d-model",
        "32",
        "--model.d-ff",
        "64",
        "--model.n-heads",
        "2",
        *LOOP[2:],
    ]
    assert main(args) == 0
    run = load_run(out)
    assert run.task_name == ("chat" if gpt else "embed") and not run.finetuned
    chosen = _chosen_weights(out)
    if TASKS[task].model == "electra":  # the model directory holds the discriminator
        chosen = {k.removeprefix("discriminator."): v for k, v in chosen.items() if k.startswith("discriminator.")}
    state = run.model.state_dict()
    assert set(state) == set(chosen)
    for name, tensor in chosen.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
