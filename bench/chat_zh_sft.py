"""Chinese chat: a real small LLM fine-tuned with LoRA on ``builtin:chatterbot-zh``, its dev perplexity beside the
4-layer GPT pretrained from scratch (docs/FINDINGS.md: 617 on the same dev conversations), and transcripts.

Perplexities over different tokenizers are not comparable token by token, so both are also given per character:
the total negative log-likelihood of the dev replies (each reply's text and the end-of-turn token that closes it,
the chat task's targets) divided by the replies' characters plus one per reply for its end. The from-scratch
model's total is its per-token perplexity's log times its own target count, counted with its tokenizer (byte-level
BPE, 16,000 tokens, trained on ``builtin:pretrain-zh`` exactly as ``configs/pretrain/gpt-tiny-zh.yaml`` trains it).

1. ``lmforge finetune chat --data builtin:chatterbot-zh`` with adapters, in a child process (wall time, peak RSS).
2. Dev perplexity per token and per character, for both models.
3. Transcripts: the user turns of the first ``--transcripts`` test conversations typed into ``lmforge chat`` (its
   default sampling), one process per conversation, printed as they come.

    python bench/chat_zh_sft.py --model runs/gemma [--epochs 3] [--out-dir runs/gemma-chat-zh]

Writes bench/results/chat_zh_sft-<run directory name>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.builtin import load_builtin  # noqa: E402
from lmforge.data.readers import corpus_texts  # noqa: E402
from lmforge.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from lmforge.tasks.dialogue import DialogueTask  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FROM_SCRATCH_PERPLEXITY = 617.0  # gpt-tiny-zh + configs/chat/gpt-tiny-chatterbot-zh.yaml, dev (docs/FINDINGS.md)


def targets_and_units(tokenizer, conversations: list[dict]) -> tuple[int, int]:
    """The chat task's target tokens on ``conversations``, and their replies' characters plus one end per reply."""
    task = DialogueTask(tokenizer, max_len=1024, dev_examples=conversations)
    targets = sum(int(flags[1:].sum()) for _, flags in task.val_items)
    replies = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant"]
    return targets, sum(len(r) for r in replies) + len(replies)


def train(args, run_dir: Path) -> dict:
    command = [
        *(sys.executable, "-m", "lmforge", "finetune", "chat", "--model", args.model),
        *("--data", "builtin:chatterbot-zh", "--out", str(run_dir), "--epochs", str(args.epochs)),
        *("--lora.rank", str(args.rank), "--lora.alpha", str(2 * args.rank), "--training.optim.lr", str(args.lr)),
        "--training.no-progress",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return {
        "command": " ".join(command[2:]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def transcript(run_dir: Path, turns: list[str]) -> str:
    typed = "".join(f"{t}\n" for t in turns) + "/quit\n"
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", "--model", str(run_dir)],
        input=typed,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="lmforge decoder directory with a chat template")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--transcripts", type=int, default=5)
    parser.add_argument("--out-dir", default=None, help="the run directory (default: runs/<model>-chat-zh)")
    parser.add_argument("--skip-train", action="store_true", help="measure an existing run")
    args = parser.parse_args()
    run_dir = Path(args.out_dir or ROOT / "runs" / f"{Path(args.model).resolve().name}-chat-zh")
    out_file = RESULTS / f"chat_zh_sft-{run_dir.name}.json"
    report = json.loads(out_file.read_text()) if out_file.is_file() and args.skip_train else {}
    if not args.skip_train:
        report["training"] = train(args, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    splits = load_builtin("chatterbot-zh")
    targets, units = targets_and_units(load_tokenizer(run_dir), splits["dev"])
    nll = results["dev"]["loss"] * targets
    report["fine_tuned"] = {
        "dev_perplexity_per_token": results["dev"]["perplexity"],
        "before_fine_tuning_per_token": results["before_finetuning"]["dev"]["perplexity"],
        "dev_targets": targets,
        "dev_perplexity_per_character": math.exp(nll / units),
        "steps": results["training"]["steps"],
    }
    scratch_tokenizer = train_tokenizer(lambda: corpus_texts(["builtin:pretrain-zh"]), kind="bpe", vocab_size=16000)
    scratch_targets, _ = targets_and_units(scratch_tokenizer, splits["dev"])
    scratch_nll = math.log(FROM_SCRATCH_PERPLEXITY) * scratch_targets
    report["from_scratch"] = {
        "dev_perplexity_per_token": FROM_SCRATCH_PERPLEXITY,
        "dev_targets": scratch_targets,
        "dev_perplexity_per_character": math.exp(scratch_nll / units),
    }
    report["dev_units"] = units
    print(json.dumps({k: report[k] for k in ("fine_tuned", "from_scratch")}, indent=1), flush=True)
    report["transcripts"] = []
    for conversation in splits["test"][: args.transcripts]:
        turns = [m["content"] for m in conversation["messages"] if m["role"] == "user"]
        text = transcript(run_dir, turns)
        report["transcripts"].append(text)
        print(text, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
