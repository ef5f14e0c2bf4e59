"""Occlusion one copy per forward pass against ``OCCLUSIONS_PER_CALL`` copies per pass: the same scores, and
how long each takes.

For a classify run, explains one text (``--text``, default a 270-character review repeated from one phrase)
with ``--method occlusion`` through ``explain/targets.explain``, alternating the two settings for ``--rounds``
rounds in this process with 2 threads, and checks that both give the same scores.

    python bench/explain_occlusion.py --model RUN [--rounds 2] [--text TEXT]

Prints and writes bench/results/explain_occlusion.json: {"model", "tokens", "seconds": {"1": [...], "16": [...]},
"same_scores"}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "explain_occlusion.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a classify run directory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--text", default="房间干净好位置不错" * 30)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    from lmforge.explain import attribution
    from lmforge.explain.targets import explain
    from lmforge.rundir import load_run

    torch.set_num_threads(2)
    run = load_run(args.model)
    batched = attribution.OCCLUSIONS_PER_CALL
    seconds: dict[str, list[float]] = {"1": [], str(batched): []}
    scores = {}
    for _ in range(args.rounds):
        for per_call in (1, batched):
            attribution.OCCLUSIONS_PER_CALL = per_call
            started = time.perf_counter()
            found = explain(run, {"text": args.text}, method="occlusion")[0]
            seconds[str(per_call)].append(round(time.perf_counter() - started, 3))
            scores[per_call] = np.array([t.score for t in found.tokens])
    result = {
        "model": args.model,
        "tokens": len(scores[1]),
        "seconds": seconds,
        "same_scores": bool(np.allclose(scores[1], scores[batched], rtol=0, atol=1e-6)),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
