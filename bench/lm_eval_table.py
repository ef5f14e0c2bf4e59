"""One table: every model on every built-in language-model task of ``lmforge evaluate`` (issue 34), with wall times.

Each ``--model NAME=DIR`` is scored by ``lmforge evaluate --model DIR --suite --limit N`` in a child process (its
wall time and peak resident memory recorded), then, for ``--shots K`` > 0, once more on the choice and generation
tasks of ``--shot-tasks`` with k shots (``--shots-only``: that pass alone, added to the model's earlier results).
The first ``--limit`` rows of each task's test split are scored (the same rows for every model); the standard errors
in the JSON say how far apart two models must be to differ. Chance levels come from the rows.

    python bench/lm_eval_table.py --model smollm2=runs/smollm2 --model gemma=runs/gemma \\
        --model gemma-zh-en=runs/gemma-zh-en [--limit 100] [--shots 5] [--shot-tasks tang-next-line ...] \\
        [--shots-only]

Writes bench/results/lm_eval_table.json and prints the table as Markdown (main metric per task: perplexity per
character, acc, BLEU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MAIN_METRIC = {"perplexity": "perplexity_per_char", "choice": "acc", "generation": "bleu"}


def evaluate(directory: str, extra: list[str], threads: int) -> tuple[list[dict], dict]:
    """``lmforge evaluate`` in a child process: its results, wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        command = [sys.executable, "-m", "lmforge", "evaluate", "--model", directory, *extra, "--output", str(out)]
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        cost = {"command": " ".join(command[2:-2]), "wall_seconds": round(wall, 1)}
        if peak > before:  # ru_maxrss of children is the largest child so far: only a new peak is this one's
            cost["peak_rss_mb"] = round(peak / 1024)
        return json.loads(out.read_text())["results"], cost


def markdown(report: dict) -> str:
    tasks = list(report["tasks"])
    head = "| model | " + " | ".join(f"{t} ({report['tasks'][t]})" for t in tasks) + " | wall |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    chance = [f"{report['chance'][t]:.3f}" if t in report["chance"] else "" for t in tasks]
    lines.append("| chance | " + " | ".join(chance) + " | |")
    for name, model in report["models"].items():
        cells = []
        for task in tasks:
            result = model["results"].get(task)
            metric = report["tasks"][task]
            if result is None:
                cells.append("")
            elif metric == "acc":
                cells.append(f"{result['acc']:.3f} ± {result['acc_stderr']:.3f}")
            elif metric == "bleu":
                cells.append(f"{result['bleu']:.2f}")
            else:
                cells.append(f"{result[metric]:.2f}")
        wall = sum(c["wall_seconds"] for c in model["runs"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR (repeat)")
    parser.add_argument("--limit", type=int, default=100, help="rows per task (the first N of its test split)")
    parser.add_argument("--shots", type=int, default=5, help="a second pass of the tasks with k shots (0: none)")
    parser.add_argument(
        "--shot-tasks",
        nargs="*",
        default=["tang-next-line", "tatoeba-zh-en-choice", "tatoeba-zh-en", "tatoeba-en-zh"],
        help="the choice and generation tasks of the k-shot pass (reviews-sentiment-prompt's 5-shot contexts are "
        "~1,000 tokens: about 6x its 0-shot cost)",
    )
    parser.add_argument(
        "--shots-only", action="store_true", help="run the k-shot pass alone, beside the model's earlier results"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "lm_eval_table.json"))
    args = parser.parse_args()
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    report.update(machine={"cpu": platform.processor() or platform.machine(), "threads": args.threads})
    for spec in args.model:
        name, _, directory = spec.partition("=")
        earlier = report["models"].get(name)
        if args.shots_only:
            if not args.shots or earlier is None or earlier["limit"] != args.limit:
                parser.error(f"--shots-only: {name} needs --shots K and an earlier run at --limit {args.limit}")
            model = earlier
        else:
            results, cost = evaluate(directory, ["--suite", "--limit", str(args.limit)], args.threads)
            model = {"directory": directory, "limit": args.limit, "runs": [cost]}
            model["results"] = {r["task"]: r for r in results}
        kinds = {task: r["kind"] for task, r in model["results"].items()}
        shot_tasks = [t for t in args.shot_tasks if kinds.get(t) in ("choice", "generation")]
        if args.shots and shot_tasks:
            extra = ["--task", *shot_tasks, "--shots", str(args.shots), "--limit", str(args.limit)]
            shot_results, cost = evaluate(directory, extra, args.threads)
            model["runs"].append(cost)
            model["results"].update({f"{r['task']} {args.shots}-shot": r for r in shot_results})
        report["models"][name] = model
        print(json.dumps({name: cost}, indent=1), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    report["tasks"], report["chance"] = {}, {}
    for model in report["models"].values():  # every task any model was scored on, in first-seen order
        for task, r in model["results"].items():
            report["tasks"].setdefault(task, MAIN_METRIC[r["kind"]])
            if "chance" in r:
                report["chance"].setdefault(task, r["chance"])
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(markdown(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
