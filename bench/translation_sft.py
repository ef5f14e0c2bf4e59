"""Translation as instruction following: a decoder fine-tuned with LoRA on the Tatoeba zh->en pairs, its test
sacreBLEU beside the from-scratch encoder-decoder's (docs/FINDINGS.md: 32.35), and the quality that survives the
way to llama.cpp (the merged model exported to GGUF at f16 and q8_0, decoded by llama.cpp itself).

1. The Tatoeba pairs, split as the translate task splits them (``data/builtin.tatoeba_cmn_en``: groups of pairs
   that share a sentence never straddle two splits), become conversations: the user asks for the English of the
   Chinese sentence (``PROMPT``), the assistant answers with the reference. ``--dev-pairs`` of the dev split are
   the dev file (perplexity during training); the test split is only decoded, once, at the end.
2. ``lmforge finetune chat`` trains the adapters for ``--steps`` optimizer steps (a budget in steps, not minutes:
   pick it from the tokens/s the run reports) in a child process, whose wall time and peak resident memory are
   recorded.
3. Greedy decoding of the 1,000 test sentences with lmforge (the run's merged model, fp32), stopping at the
   end-of-turn token; sacreBLEU (13a) and chrF against the references (``metrics.translation_metrics``).
4. ``lmforge export RUN --to gguf --quant f16|q8_0``, then the same prompts' token ids sent to llama.cpp's server
   (``tests/models/llamacpp.py``), greedy, stopping at its end-of-generation tokens; BLEU of each file.

    python bench/translation_sft.py --model runs/gemma --steps 700 [--out-dir runs/gemma-zh-en] [--skip-train]

Writes bench/results/translation_sft-<run directory name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.builtin import tatoeba_cmn_en  # noqa: E402
from lmforge.data.readers import write_jsonl  # noqa: E402
from lmforge.inference.chat import chat_prompt_ids  # noqa: E402
from lmforge.inference.config import GenerationConfig  # noqa: E402
from lmforge.inference.generate import Generator  # noqa: E402
from lmforge.metrics import translation_metrics  # noqa: E402
from lmforge.rundir import load_run  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT = "把下面的中文翻译成英文：\n{zh}"


def conversation(pair: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": PROMPT.format(zh=pair["zh"])},
            {"role": "assistant", "content": pair["en"]},
        ]
    }


def train(args, splits: dict, run_dir: Path) -> dict:
    """``lmforge finetune chat`` with adapters in a child process: its wall time and peak RSS."""
    data = run_dir.parent / f"{run_dir.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "train.jsonl", [conversation(p) for p in splits["train"]])
    write_jsonl(data / "dev.jsonl", [conversation(p) for p in splits["dev"][: args.dev_pairs]])
    command = [
        *(sys.executable, "-m", "lmforge", "finetune", "chat", "--model", args.model),
        *("--train", str(data / "train.jsonl"), "--dev", str(data / "dev.jsonl"), "--out", str(run_dir)),
        *("--lora.rank", str(args.rank), "--lora.alpha", str(2 * args.rank), "--epochs", "0"),
        *("--training.max-steps", str(args.steps), "--training.eval-every", str(args.steps // 2)),
        *("--training.global-batch-size", "16", "--training.micro-batch-size", "16", "--max-len", "96"),
        *("--training.optim.lr", str(args.lr), "--training.optim.warmup-steps", "30", "--training.no-progress"),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "command": " ".join(command[2:]),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak),
        "steps": results["training"]["steps"],
        "dev": {k: results["dev"][k] for k in ("perplexity", "accuracy") if k in results["dev"]},
        "tokens_per_s": results["training"].get("tokens_per_s"),
    }


def prompts(run, pairs: list[dict]) -> list[list[int]]:
    return [chat_prompt_ids(run.task.tokenizer, conversation(p)["messages"][:1], limit=256) for p in pairs]


def decode_lmforge(run, ids: list[list[int]], batch: int) -> tuple[list[str], float]:
    eot = [i for i in (run.task.tokenizer.token_id("eot"), run.task.tokenizer.token_id("im_end")) if i is not None]
    config = GenerationConfig(max_new_tokens=64, stop_token_ids=eot)
    generator = Generator(run.model, run.task.tokenizer)
    started = time.perf_counter()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    texts = [""] * len(ids)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        for i, reply in zip(chunk, generator.generate([ids[i] for i in chunk], config), strict=True):
            texts[i] = reply.text.strip()
    return texts, time.perf_counter() - started


def decode_llamacpp(gguf: Path, ids: list[list[int]], tokenizer, threads: int) -> tuple[list[str], float]:
    from tests.models.llamacpp import LlamaCpp

    server = LlamaCpp(gguf, n_ctx=256, threads=threads)
    started, texts = time.perf_counter(), []
    try:
        for prompt in ids:
            body = {"prompt": prompt, "n_predict": 64, "temperature": 0, "top_k": 1, "return_tokens": True}
            reply = server._post("/completion", {**body, "cache_prompt": False})
            texts.append(tokenizer.decode(reply["tokens"]).strip())
    finally:
        server.close()
    return texts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="lmforge decoder directory (lmforge convert --builtin ...)")
    parser.add_argument(
        "--tatoeba", default=None, help="another Tatoeba TSV (default: $LMFORGE_TATOEBA, else the shipped pairs)"
    )
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--dev-pairs", type=int, default=200)
    parser.add_argument("--test-pairs", type=int, default=1000, help="the first N test pairs (a quick check: fewer)")
    parser.add_argument("--batch", type=int, default=32, help="sentences decoded together by lmforge")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="the run directory (default: runs/<model>-zh-en-sft)")
    parser.add_argument("--skip-train", action="store_true", help="decode an existing run")
    parser.add_argument("--quants", nargs="*", default=["f16", "q8_0"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = Path(args.model).resolve().name
    run_dir = Path(args.out_dir or ROOT / "runs" / f"{name}-zh-en-sft")
    splits = tatoeba_cmn_en(args.tatoeba)
    out_file = RESULTS / f"translation_sft-{run_dir.name}.json"
    report = json.loads(out_file.read_text()) if out_file.is_file() and args.skip_train else {}
    report.update(
        machine={
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        split={k: len(v) for k, v in splits.items()},
        prompt=PROMPT,
    )
    if not args.skip_train:
        report["training"] = train(args, splits, run_dir)
        print(json.dumps(report["training"], indent=1), flush=True)
    run = load_run(run_dir)
    test = splits["test"][: args.test_pairs]
    references = [p["en"] for p in test]
    ids = prompts(run, test)
    hypotheses, seconds = decode_lmforge(run, ids, args.batch)
    report["lmforge"] = {**translation_metrics(hypotheses, references, target_lang="en"), "seconds": round(seconds, 1)}
    pairs = zip(test[:10], hypotheses[:10], strict=True)
    report["samples"] = [{"zh": p["zh"], "reference": p["en"], "lmforge": h} for p, h in pairs]
    print(json.dumps(report["lmforge"], indent=1), flush=True)
    for quant in args.quants:
        gguf = run_dir.parent / f"{run_dir.name}-{quant}.gguf"
        export = [sys.executable, "-m", "lmforge", "export", str(run_dir), "--to", "gguf", "--quant", quant]
        subprocess.run([*export, "--out", str(gguf)], check=True, cwd=ROOT)
        texts, seconds = decode_llamacpp(gguf, ids, run.task.tokenizer, args.threads)
        metrics = translation_metrics(texts, references, target_lang="en")
        report[f"llamacpp_{quant}"] = {
            **metrics,
            "seconds": round(seconds, 1),
            "file_mb": round(gguf.stat().st_size / 2**20),
        }
        report[f"llamacpp_{quant}"]["bleu_lost"] = round(report["lmforge"]["bleu"] - metrics["bleu"], 2)
        print(quant, json.dumps(report[f"llamacpp_{quant}"], indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
