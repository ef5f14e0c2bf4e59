"""Preference tuning with a signal that can be checked: DPO (or ORPO) on the zh->en translator of
``bench/translation_sft.py``, chosen = the reference translation, rejected = the SFT model's own worst sample of the
same source by sentence chrF, and the test BLEU / chrF after it beside the SFT model's.

1. ``--pairs`` training pairs of the Tatoeba split (from the end of the training split; the test split produces no
   pair): ``--samples`` sampled translations each (temperature 1.0, no top-p, seed 0) by the SFT run; the one
   with the lowest sentence chrF against the reference is the rejected reply (a source whose worst sample is the
   reference itself teaches nothing and is left out).
2. ``lmforge finetune dpo|orpo --model SFT_RUN`` with LoRA adapters, in a child process (wall time, peak RSS).
3. Greedy decoding of the test sentences exactly as ``bench/translation_sft.py`` decodes them; sacreBLEU and chrF,
   and the SFT run's scores read from its results file.

    python bench/preference_translation.py --sft runs/gemma-zh-en [--method dpo] [--pairs 256] [--steps 64]
    python bench/preference_translation.py --sft runs/gemma-zh-en --method orpo \
        --pairs-file runs/gemma-zh-en-dpo-pairs.jsonl   # the DPO run's pairs: the same signal, no sampling

Writes bench/results/preference_translation-<method>-<SFT run directory name>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from sacrebleu.metrics import CHRF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from translation_sft import PROMPT, decode_lmforge, prompts  # noqa: E402

from lmforge.data.builtin import tatoeba_cmn_en  # noqa: E402
from lmforge.data.readers import write_jsonl  # noqa: E402
from lmforge.inference.config import GenerationConfig  # noqa: E402
from lmforge.inference.generate import Generator  # noqa: E402
from lmforge.metrics import translation_metrics  # noqa: E402
from lmforge.rundir import load_run  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def preference_pairs(run, pairs: list[dict], samples: int, batch: int) -> tuple[list[dict], dict]:
    """Chosen = the reference; rejected = the worst of ``samples`` sampled translations by sentence chrF."""
    tokenizer = run.task.tokenizer
    eot = [i for i in (tokenizer.token_id("eot"), tokenizer.token_id("im_end")) if i is not None]
    config = GenerationConfig(
        max_new_tokens=64,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,  # plain sampling: top-p over a 262k vocabulary sorts every flat row, the cost of the decoding itself
        seed=0,
        num_return_sequences=samples,
        stop_token_ids=eot,
    )
    generator, chrf = Generator(run.model, tokenizer), CHRF()
    ids = prompts(run, pairs)
    rows, worst_scores, started = [], [], time.perf_counter()
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        replies = generator.generate(ids[start : start + batch], config)
        for i, pair in enumerate(chunk):
            texts = [r.text.strip() for r in replies[i * samples : (i + 1) * samples]]
            scored = sorted((chrf.sentence_score(t, [pair["en"]]).score, t) for t in texts)
            score, worst = scored[0]
            if worst == pair["en"] or not worst:
                continue
            worst_scores.append(score)
            user = {"role": "user", "content": PROMPT.format(zh=pair["zh"])}
            rows.append({"messages": [user], "chosen": pair["en"], "rejected": worst})
    stats = {
        "sources": len(pairs),
        "pairs": len(rows),
        "samples_per_source": samples,
        "mean_rejected_chrf": round(sum(worst_scores) / max(len(worst_scores), 1), 2),
        "sampling_seconds": round(time.perf_counter() - started, 1),
    }
    return rows, stats


def train(args, data: Path, run_dir: Path) -> dict:
    command = [
        *(sys.executable, "-m", "lmforge", "finetune", args.method, "--model", args.sft),
        *("--train", str(data), "--out", str(run_dir), "--epochs", "0"),
        *("--lora.rank", str(args.rank), "--lora.alpha", str(2 * args.rank), "--beta", str(args.beta)),
        *("--training.max-steps", str(args.steps), "--training.eval-every", str(args.steps // 2)),
        *("--training.optim.lr", str(args.lr), "--training.no-progress"),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "command": " ".join(command[2:]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "dev": results["dev"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="the chat run of bench/translation_sft.py")
    parser.add_argument("--sft-results", default=None, help="its results (default: bench/results/translation_sft-*)")
    parser.add_argument(
        "--tatoeba", default=None, help="another Tatoeba TSV (default: $LMFORGE_TATOEBA, else the shipped pairs)"
    )
    parser.add_argument("--method", choices=["dpo", "orpo"], default="dpo")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="the run directory (default: SFT_RUN-<method>)")
    parser.add_argument(
        "--pairs-file", default=None, help="train on the pairs another method's run wrote (same signal, no sampling)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sft_dir = Path(args.sft)
    run_dir = Path(args.out_dir or f"{sft_dir}-{args.method}")
    sft_results = Path(args.sft_results or RESULTS / f"translation_sft-{sft_dir.name}.json")
    splits = tatoeba_cmn_en(args.tatoeba)
    report = {"sft": str(sft_dir), "method": args.method}
    data = run_dir.parent / f"{run_dir.name}-pairs.jsonl"
    if args.pairs_file:
        data = Path(args.pairs_file)
        report["pairs"] = {"file": str(data), "pairs": sum(1 for line in data.open(encoding="utf-8") if line.strip())}
    else:
        sources = splits["train"][-args.pairs :]
        rows, report["pairs"] = preference_pairs(load_run(sft_dir), sources, args.samples, args.batch)
        write_jsonl(data, rows)
    print(json.dumps(report["pairs"], indent=1), flush=True)
    report["training"] = train(args, data, run_dir)
    print(json.dumps(report["training"], indent=1), flush=True)
    run = load_run(run_dir)
    test = splits["test"][: args.test_pairs]
    hypotheses, seconds = decode_lmforge(run, prompts(run, test), args.batch)
    metrics = translation_metrics(hypotheses, [p["en"] for p in test], target_lang="en")
    report["tuned"] = {**metrics, "seconds": round(seconds, 1)}
    if sft_results.is_file():
        before = json.loads(sft_results.read_text())["lmforge"]
        report["sft_test"] = {k: before[k] for k in ("bleu", "chrf")}
        report["change"] = {k: round(metrics[k] - before[k], 2) for k in ("bleu", "chrf")}
    print(json.dumps({k: report.get(k) for k in ("tuned", "sft_test", "change")}, indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / f"preference_translation-{args.method}-{sft_dir.name}.json"
    out_file.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
