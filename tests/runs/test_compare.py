"""`lmforge compare`: equal-FLOP step counts, the aggregate over seeds, the claim, and a resumable tiny run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.files import write_yaml
from lmforge.runs.compare import CompareConfig, aggregate, claim, report

TINY = ["--limit", "30", "--budget-mlm-steps", "4", "--classify-epochs", "0.5", "--ner-epochs", "0.5", "--no-progress"]


def _run(objective: str, seed: int, accuracy: float, f1: float, minutes: float | None = 1.0) -> dict:
    run = {
        "objective": objective,
        "seed": seed,
        "reviews-sentiment": {"test": {"accuracy": accuracy}},
        "peoples-daily-ner": {"test": {"f1": f1}},
    }
    if minutes is not None:
        run["pretraining"] = {
            "seconds": 60 * minutes,
            "seconds_at_median_speed": 50 * minutes,
            "train_flops": 2e15,
            "steps": 10,
        }
    return run


def test_aggregate_is_mean_and_sample_std_over_seeds() -> None:
    runs = [_run("mlm", s, a, f) for s, a, f in ((1, 0.80, 0.50), (2, 0.82, 0.54), (3, 0.84, 0.58))]
    runs += [_run("scratch", 1, 0.7, 0.3, minutes=None)]
    found = aggregate(runs)
    assert found["mlm"]["reviews-sentiment"]["mean"] == pytest.approx(0.82)
    assert found["mlm"]["reviews-sentiment"]["std"] == pytest.approx(0.02)  # sample (n - 1) deviation
    assert found["mlm"]["peoples-daily-ner"]["values"] == [0.50, 0.54, 0.58]
    assert found["mlm"]["peoples-daily-ner"]["std"] == pytest.approx(statistics.stdev([0.50, 0.54, 0.58]))
    assert found["mlm"]["pretraining_pflops"]["mean"] == pytest.approx(2.0)
    assert found["mlm"]["pretraining_minutes_at_median_speed"]["mean"] == pytest.approx(50 / 60)
    assert found["scratch"]["reviews-sentiment"]["std"] == 0.0 and "pretraining_minutes" not in found["scratch"]


def test_claim_needs_electra_at_least_mlm_on_both_tasks() -> None:
    mlm = [_run("mlm", s, 0.80 + 0.01 * s, 0.50) for s in (1, 2, 3)]
    better = [_run("electra", s, 0.82 + 0.01 * s, 0.51) for s in (1, 2, 3)]
    worse_ner = [_run("electra", s, 0.82 + 0.01 * s, 0.49) for s in (1, 2, 3)]
    c = claim(aggregate(mlm + better))
    assert c["electra_at_least_mlm"] is True
    assert c["tasks"]["reviews-sentiment"]["electra_minus_mlm"] == pytest.approx(0.02)
    assert c["tasks"]["reviews-sentiment"]["in_spreads"] == pytest.approx(2.0)  # gap / std 0.01
    assert c["tasks"]["peoples-daily-ner"]["in_spreads"] is None  # no spread at all
    assert claim(aggregate(mlm + worse_ner))["electra_at_least_mlm"] is False
    assert claim(aggregate(mlm)) == {}


def test_report_shows_every_objective_and_the_verdict() -> None:
    runs = [_run("mlm", 1, 0.8, 0.5), _run("electra", 1, 0.7, 0.6), _run("scratch", 1, 0.6, 0.4, minutes=None)]
    summary = {
        "budget": {
            "size": "bert-tiny",
            "budget_flops": 2e15,
            "mlm_steps": 10,
            "batch_size": 64,
            "seq_len": 128,
            "objectives": {"mlm": {"lr": 2e-3}, "electra": {"lr": 5e-4}},
        },
        "runs": runs,
        "summary": aggregate(runs),
    }
    summary["claim"] = claim(summary["summary"])
    text = report(summary)
    assert "| mlm | 0.002 | 10 |" in text and "| none (random init) | - |" in text
    assert "does not hold" in text and "ELECTRA - MLM = -0.1000" in text


def test_config_rejects_unknown_objectives_and_repeated_seeds() -> None:
    with pytest.raises(ValueError, match="choose from"):
        CompareConfig(objectives=["bert"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="each once"):
        CompareConfig(seeds=[1, 1])


def test_tiny_comparison_spends_equal_flops_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--objectives", "mlm", "electra", "--seeds", "1", "2", *TINY]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    budget = results["budget"]
    for name, planned in budget["objectives"].items():
        # the step count is the budget over the objective's FLOPs per step, rounded
        assert abs(planned["steps"] * planned["flops_per_step"] - budget["budget_flops"]) <= planned["flops_per_step"]
        for run in (r for r in results["runs"] if r["objective"] == name):
            assert run["pretraining"]["steps"] == planned["steps"]
            # the counted FLOPs of the real run are the budget, up to half a step and the masking's variation
            gap = abs(run["pretraining"]["train_flops"] - budget["budget_flops"])
            assert gap <= 0.5 * planned["flops_per_step"] + 0.05 * budget["budget_flops"]
    assert budget["objectives"]["electra"]["steps"] < budget["objectives"]["mlm"]["steps"]
    assert [(r["objective"], r["seed"]) for r in results["runs"]] == [
        ("mlm", 1),
        ("electra", 1),
        ("scratch", 1),
        ("mlm", 2),
        ("electra", 2),
        ("scratch", 2),
    ]
    assert set(results["summary"]) == {"mlm", "electra", "scratch"} and "electra_at_least_mlm" in results["claim"]
    assert (out / "compare.png").stat().st_size > 10_000
    assert "![comparison](compare.png)" in (out / "report.md").read_text()
    weights = out / "pretrain" / "mlm-seed1" / "model.safetensors"
    weights.rename(out / "moved-away")  # a rerun of this stage would write it again
    stamp = (out / "finetune" / "electra" / "seed2" / "peoples-daily-ner" / "results.json").stat().st_mtime_ns
    assert main(args) == 0  # every stage finished: nothing is trained again, the same results come out
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == results["summary"] and not weights.exists()
    assert (out / "finetune" / "electra" / "seed2" / "peoples-daily-ner" / "results.json").stat().st_mtime_ns == stamp


def test_other_settings_need_another_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    write_yaml(out / "config.yaml", CompareConfig(out=str(out), budget_mlm_steps=4))
    assert main(["compare", "--out", str(out), "--budget-mlm-steps", "8", "--no-progress"]) == 2
    said = capsys.readouterr().out
    assert "other budget_mlm_steps (budget_mlm_steps=4)" in said and "use another --out" in said
