"""Which attribution method is most faithful for our classifiers: deletion curves and ERASER scores per method.

For each of the first ``--n`` reviews of ``builtin:reviews-sentiment``'s test split and each method of
``tasks/explain.py`` (ig, grad-x-input, occlusion, attention), ``faithfulness`` deletes the method's top-k tokens
(k = 1..5) and k random ones (10 draws), and computes ERASER's comprehensiveness and sufficiency (AOPC over the
top 1/5/10/20/50% of the tokens), all on the predicted class's probability. Reported: the mean drop per k for
the top and the random tokens, the mean comprehensiveness (higher: more faithful) and sufficiency (lower: more
faithful), and seconds per review.

    python bench/explain_faithfulness.py --model runs/demo/reviews-sentiment/pretrained [--n 200] [--steps 50]
        [--methods ig grad-x-input occlusion attention] [--out FILE]

Writes bench/results/explain_faithfulness.json: {"machine", "settings", "models": {RUN: {METHOD: {...}}}}; a
second model is added to the same file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lmforge.data.builtin import load_builtin
from lmforge.explain.attribution import METHODS
from lmforge.explain.faithfulness import faithfulness
from lmforge.rundir import load_run

RESULTS = Path(__file__).parent / "results" / "explain_faithfulness.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a classify run on reviews-sentiment")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.model, task="classify")
    texts = [ex["text"] for ex in load_builtin("reviews-sentiment")["test"][: args.n]]
    per_method = {}
    for method in args.methods:
        started = time.perf_counter()
        rows = [faithfulness(run, t, method=method, steps=args.steps) for t in texts]
        seconds = (time.perf_counter() - started) / len(texts)
        curve = {
            kind: {
                k: statistics.mean(r[kind][k] for r in rows if k in r[kind])
                for k in (1, 2, 3, 4, 5)
                if any(k in r[kind] for r in rows)
            }
            for kind in ("deletion_top", "deletion_random")
        }
        per_method[method] = {
            **curve,
            "comprehensiveness": statistics.mean(r["comprehensiveness"] for r in rows),
            "sufficiency": statistics.mean(r["sufficiency"] for r in rows),
            "seconds_per_text": seconds,
            "texts": len(rows),
        }
        top, rand = curve["deletion_top"], curve["deletion_random"]
        print(
            f"{method:13s} drop top-1/3/5 {top[1]:.3f}/{top[3]:.3f}/{top[5]:.3f}  random {rand[1]:.3f}/{rand[3]:.3f}/"
            f"{rand[5]:.3f}  comprehensiveness {per_method[method]['comprehensiveness']:.3f}  sufficiency "
            f"{per_method[method]['sufficiency']:.3f}  {seconds:.2f} s/text",
            flush=True,
        )
    out = Path(args.out)
    existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    models = {**existing.get("models", {}), args.model: per_method}
    result = {
        "machine": {"processor": platform.processor(), "threads": args.threads, "torch": torch.__version__},
        "settings": {"data": "builtin:reviews-sentiment test", "n": args.n, "ig_steps": args.steps},
        "models": models,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
