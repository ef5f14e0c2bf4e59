"""Preference tuning (tasks/preference.py): DPO's and ORPO's losses checked by hand, the pairs read in TRL's formats
and refused when they teach nothing, the replies scored exactly (the reference pass equals the policy before any
step: DPO's first loss is log 2), long prompts cut from the left and reported, and ``lmforge finetune dpo`` /
``orpo`` learning a verifiable preference on a tiny GPT, with the reference log-probabilities cached and reused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data.readers import preference_example, read_preferences, write_jsonl
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.models.registry import load_model
from lmforge.rundir import load_run
from lmforge.tasks.preference import REFERENCE_DIR, DPOTask, ORPOTask, dpo_losses, orpo_losses
from tests.commands.test_bad_inputs import _fails

FAST = ["--training.no-progress", "--training.peak-tflops", "1", "--epochs", "0"]


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_dpo_loss_and_rewards_by_hand() -> None:
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    reference = torch.tensor([[-11.0, -11.0], [-5.0, -5.0]])
    losses, counts = dpo_losses(chosen, rejected, reference, beta=0.5)
    # pair 1: rewards 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5; pair 2: 0.5 and 1.0
    assert losses.tolist() == pytest.approx([-_log_sigmoid(1.0), -_log_sigmoid(-0.5)])
    assert counts["rewards/chosen"] == pytest.approx(1.0) and counts["rewards/rejected"] == pytest.approx(0.5)
    assert counts["rewards/accuracies"] == 1.0 and counts["rewards/margins"] == pytest.approx(1.0 - 0.5)
    assert counts["logps/chosen"] == pytest.approx(-14.0)
    smoothed, _ = dpo_losses(chosen, rejected, reference, beta=0.5, label_smoothing=0.1)
    assert smoothed[0].item() == pytest.approx(-0.9 * _log_sigmoid(1.0) - 0.1 * _log_sigmoid(-1.0))


def test_orpo_loss_by_hand() -> None:
    chosen, rejected = torch.tensor([-2.0]), torch.tensor([-6.0])  # summed over 4 and 3 tokens
    losses, counts = orpo_losses(chosen, rejected, torch.tensor([4.0]), torch.tensor([3.0]), beta=0.1)
    mean_c, mean_r = -0.5, -2.0
    log_odds = (mean_c - mean_r) - (math.log(1 - math.exp(mean_c)) - math.log(1 - math.exp(mean_r)))
    assert losses.item() == pytest.approx(0.5 - 0.1 * _log_sigmoid(log_odds))
    assert counts["nll_loss"] == pytest.approx(0.5) and counts["log_odds_chosen"] == pytest.approx(log_odds)
    assert counts["rewards/chosen"] == pytest.approx(0.1 * mean_c) and counts["rewards/accuracies"] == 1.0
    # a reply of probability near 1 (mean log P -1e-9) keeps log(1 - P) finite
    near_one, _ = orpo_losses(torch.tensor([-1e-9]), rejected, torch.tensor([1.0]), torch.tensor([3.0]), beta=0.1)
    assert torch.isfinite(near_one).all()


def test_preference_rows_in_trls_formats_and_the_ones_refused(tmp_path: Path) -> None:
    user = {"role": "user", "content": "hi"}
    text, _ = preference_example({"prompt": "hi", "chosen": "hello", "rejected": "go away"})
    assert text == {"messages": [user], "chosen": "hello", "rejected": "go away"}
    conversational, _ = preference_example(
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    )
    assert conversational == {"messages": [user], "chosen": "hello", "rejected": "no"}
    implicit, _ = preference_example(
        {
            "chosen": [user, {"role": "assistant", "content": "hello"}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        }
    )
    assert implicit == {"messages": [user], "chosen": "hello", "rejected": "no"}
    rows = [
        {"prompt": "hi", "chosen": "hello"},
        {"prompt": "hi", "chosen": "same", "rejected": "same"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": "hi", "chosen": "", "rejected": "b"},
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(
        UserError, match=r"p.jsonl:1: a preference row needs 'chosen' and 'rejected'; missing 'rejected'"
    ):
        read_preferences(tmp_path / "p.jsonl")
    examples, report = read_preferences(tmp_path / "p.jsonl", skip_bad_rows=True)
    assert len(examples) == 1 and examples[0]["source"].endswith("p.jsonl:5")
    problems = " | ".join(report.skipped)
    assert "the pair prefers nothing" in problems and "no prompt" in problems and "'chosen' is empty" in problems


def test_replies_are_scored_exactly_and_long_prompts_are_cut_from_the_left(chat_gpt: Path) -> None:
    tok = load_tokenizer(chat_gpt)
    long_prompt = "房间" * 40
    pairs = [
        {"messages": [{"role": "user", "content": "房间怎么样"}], "chosen": "很好", "rejected": "很差，不推荐"},
        {"messages": [{"role": "user", "content": long_prompt}], "chosen": "干净", "rejected": "不干净"},
    ]
    task = DPOTask(tok, max_len=32, splits={"train": pairs})
    (c_ids, c_flags, r_ids, r_flags), (lc_ids, lc_flags, _, _) = task.train_items
    reply = tok.decode([i for i, f in zip(c_ids, c_flags, strict=True) if f], skip_special_tokens=False)
    assert reply == "很好<|im_end|>"  # the reply and the end of its turn, nothing of the prompt
    rejected = tok.decode([i for i, f in zip(r_ids, r_flags, strict=True) if f], skip_special_tokens=False)
    assert rejected == "很差，不推荐<|im_end|>"
    assert len(lc_ids) <= 32 and lc_flags.sum() > 0 and lc_ids[0] != c_ids[0]  # its start was cut
    assert task.truncated == {"train": 1, "train_prompts_cut_from_the_left": 1}
    model = load_model(chat_gpt)
    batch = task.reply_batch(task.train_items)
    with torch.no_grad():
        logps = task.log_likelihoods(model, batch)
        alone = task.log_likelihoods(model, task.reply_batch(task.train_items[:1]))
        full = torch.log_softmax(model(torch.from_numpy(c_ids.astype("int64"))[None]), -1)[0]
    by_hand = sum(full[t - 1, c_ids[t]].item() for t in range(1, len(c_ids)) if c_flags[t])
    assert logps[0].item() == pytest.approx(by_hand, abs=1e-4)
    assert alone[0].item() == pytest.approx(logps[0].item(), abs=1e-4)  # padding in a batch changes nothing
    assert alone[1].item() == pytest.approx(logps[2].item(), abs=1e-4)  # rejected rows follow the chosen ones


def _splits() -> dict[str, list[dict]]:
    """A verifiable preference: about whatever two things the user names, the reply that praises them (很好) is
    chosen over the one that runs them down (很差). 90 distinct pairs: 60 train, 15 dev, 15 test."""
    import itertools
    import random

    words = ["房间", "早餐", "服务", "位置", "价格", "环境", "交通", "前台", "设施", "卫生"]
    named = list(itertools.permutations(words, 2))
    random.Random(0).shuffle(named)
    rows = [{"prompt": f"说说{a}和{b}", "chosen": f"{a}和{b}都很好", "rejected": f"{a}和{b}都很差"} for a, b in named]
    return {"train": rows[:60], "dev": rows[60:75], "test": rows[75:]}


@pytest.mark.parametrize(("method", "adapters"), [("dpo", False), ("orpo", False), ("dpo", True)])
def test_preference_tuning_learns_the_preferred_reply_and_saves_a_chat_run(
    method: str, adapters: bool, tmp_path: Path, chat_gpt: Path, caplog
) -> None:
    splits = _splits()
    for split, rows in splits.items():
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    files = [f"--{s}={tmp_path / f'{s}.jsonl'}" for s in ("train", "dev", "test")]
    out = tmp_path / "run"
    steps = [
        "--training.max-steps",
        "60",
        "--training.eval-every",
        "30",
        "--training.optim.lr",
        "3e-3",
        "--beta",
        "0.5",
    ]
    lora = ["--lora.rank", "8", "--lora.alpha", "32"] if adapters else []
    args = ["finetune", method, "--model", str(chat_gpt), *files, "--out", str(out), *steps, *lora, *FAST]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == adapters
    assert results["test"]["rewards/accuracies"] >= 0.9  # chance: 0.5
    assert json.loads((out / "task.json").read_text())["task"] == "chat"
    assert load_run(out).task_name == "chat"
    cached = sorted((out / REFERENCE_DIR).glob("*.safetensors"))
    assert len(cached) == (2 if method == "dpo" else 0)  # 90 pairs in chunks of 64; ORPO needs no reference
    # the model before training, scored as the run scored its test pairs (a second run on the same model and pairs
    # reads the reference log-probabilities instead of computing them)
    caplog.set_level("INFO", logger="lmforge.tasks.preference")
    again = tmp_path / "again"
    for chunk in cached:
        (again / REFERENCE_DIR).mkdir(parents=True, exist_ok=True)
        (again / REFERENCE_DIR / chunk.name).write_bytes(chunk.read_bytes())
    read = {split: read_preferences(tmp_path / f"{split}.jsonl")[0] for split in splits}
    task, base = {"dpo": DPOTask, "orpo": ORPOTask}[method].for_finetuning(_settings(chat_gpt), read, again)
    before = task.evaluate(base, read["test"], device=torch.device("cpu"))
    if method == "dpo":
        assert "0 pairs computed, 90 read" in caplog.text
        assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference before any step
        assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    else:
        assert results["test"]["nll_loss"] < before["nll_loss"]  # ORPO also fine-tunes on the chosen replies
    assert results["test"]["loss"] < before["loss"]


def _settings(model: Path):
    from types import SimpleNamespace

    return SimpleNamespace(model=str(model), max_len=None, beta=0.1, label_smoothing=0.0)


def test_bad_preference_settings_are_refused_before_any_work(tmp_path: Path, chat_gpt: Path, capsys) -> None:
    write_jsonl(tmp_path / "train.jsonl", _splits()["train"])
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "说说房间", "chosen": "很好"}])
    train = ["--train", str(tmp_path / "train.jsonl")]
    base = ["--model", str(chat_gpt), "--out", str(tmp_path / "run"), *FAST]
    _fails(capsys, ["finetune", "dpo", *base, *train, "--beta", "0"], "beta=0.0 must be > 0")
    _fails(capsys, ["finetune", "dpo", *base, *train, "--label-smoothing", "0.6"], "label_smoothing")
    _fails(capsys, ["finetune", "orpo", *base, *train, "--label-smoothing", "0.1"], "--label-smoothing")  # DPO's
    _fails(capsys, ["finetune", "dpo", *base, "--data", "builtin:chatterbot-zh"], "has no built-in corpus")
    _fails(capsys, ["finetune", "dpo", *base, "--train", str(tmp_path / "bad.jsonl")], "bad.jsonl:1", "'rejected'")
    assert not (tmp_path / "run" / REFERENCE_DIR).exists()
