"""LoRA fine-tuning speed of lmforge against transformers + PEFT on the same model, and the peak memory of LoRA
against full fine-tuning.

Both sides hold the same decoder (``--model``, an lmforge directory such as ``lmforge convert --builtin
smollm2-135m-instruct``; transformers runs it as its own class, ``generate_vs_hf._models``) with the same adapters:
rank 8, alpha 16, every attention and feed-forward projection (lmforge: ``models/lora.add_lora``'s default targets;
PEFT: ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``), fp32, AdamW (lr 1e-4) over the adapters only.
One training step = forward, the causal-LM loss on every position, backward, optimizer step, on a batch of 8 x 128
token ids of text (``docs/en``). lmforge computes the loss as its chat / CLM tasks do (the fused chunked linear +
cross-entropy of ``ops/linear_cross_entropy.py``); transformers as ``model(input_ids, labels=...)``. Rounds of
``--steps`` steps alternate between the two, same threads; medians of tokens/s are compared.

Peak memory (``--memory``): one child process each for lmforge full fine-tuning (every weight, AdamW), LoRA on the
fp32 base and LoRA on an int8 base (``--lora.base int8``), each running 3 steps; the peak resident set
(VmHWM) of each; then the same three with activation checkpointing (``--training.activation-checkpointing``: each
block recomputed in the backward pass). The model is loaded in fp32 first, so the int8 runs' peak includes that
moment.

    python bench/lora_vs_peft.py --model runs/smollm2 [--rounds 3] [--steps 5] [--threads 2] [--memory]

Writes bench/results/lora_vs_peft-<model directory name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from lmforge.models.lora import add_lora
from lmforge.models.specs import LoRASpec
from lmforge.ops.linear_cross_entropy import linear_cross_entropy

RESULTS = Path(__file__).parent / "results"
BATCH, LENGTH, RANK, ALPHA = 8, 128, 8, 16.0
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch_of_text(tok) -> torch.Tensor:
    pages = sorted((Path(__file__).parents[1] / "docs" / "en").rglob("*.md"))
    ids = tok.encode("\n\n".join(p.read_text(encoding="utf-8") for p in pages))[: BATCH * LENGTH]
    return torch.tensor(ids).view(BATCH, LENGTH)


def lmforge_step(model, optimizer, ids: torch.Tensor) -> float:
    hidden = model.hidden_states(ids[:, :-1])
    weight = model.embed.word.weight if model.lm_head is None else model.lm_head.weight
    loss_sum, _ = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, ids[:, 1:].reshape(-1))
    loss = loss_sum / ids[:, 1:].numel()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def peft_step(model, optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def timed(step, model, optimizer, ids, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, ids)
    return steps * ids[:, 1:].numel() / (time.perf_counter() - start)


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def memory_child(model_dir: str, kind: str, threads: int) -> None:
    """Run 3 steps of ``kind`` (full / lora / lora-int8, ``+recompute`` for activation checkpointing) and print the
    peak resident set in MB."""
    torch.set_num_threads(threads)
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.registry import load_model, transformer_blocks
    from lmforge.train.loop import recompute_in_backward

    kind, _, recompute = kind.partition("+")
    model = load_model(model_dir).train()
    if kind.startswith("lora"):
        add_lora(model, LoRASpec(rank=RANK, alpha=ALPHA, base="int8" if kind == "lora-int8" else "fp32"))
    if recompute:
        for block in transformer_blocks(model):
            recompute_in_backward(block)
    optimizer = adamw(model)
    ids = batch_of_text(load_tokenizer(model_dir))
    for _ in range(3):
        lmforge_step(model, optimizer, ids)
    print(json.dumps({"peak_rss_mb": _high_water_mb()}))


def _high_water_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: on Linux a child started from a large parent
    reports the parent's peak there."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak(model_dir: str, kind: str, threads: int) -> float:
    cmd = [sys.executable, __file__, "--model", model_dir, "--memory-child", kind, "--threads", str(threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.model, args.memory_child, args.threads)
    torch.set_num_threads(args.threads)
    import peft  # (not imported by the memory children: only what lmforge's own training loads counts there)
    import transformers
    from generate_vs_hf import _models

    ours, tok, hf = _models(args.model)
    ours.train()
    add_lora(ours, LoRASpec(rank=RANK, alpha=ALPHA))
    theirs = peft.get_peft_model(
        hf.train(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS)
    )
    ids = batch_of_text(tok)
    opt_ours, opt_theirs = adamw(ours), adamw(theirs)
    first = (lmforge_step(ours, opt_ours, ids), peft_step(theirs, opt_theirs, ids))
    trainable = (
        sum(p.numel() for p in ours.parameters() if p.requires_grad),
        sum(p.numel() for p in theirs.parameters() if p.requires_grad),
    )
    print(f"first-step losses: lmforge {first[0]:.4f}, PEFT {first[1]:.4f}; trainable parameters {trainable}")
    rounds: dict[str, list[float]] = {"lmforge": [], "peft": []}
    for r in range(args.rounds):
        rounds["lmforge"].append(timed(lmforge_step, ours, opt_ours, ids, args.steps))
        rounds["peft"].append(timed(peft_step, theirs, opt_theirs, ids, args.steps))
        print(f"round {r + 1}: lmforge {rounds['lmforge'][-1]:,.0f}, PEFT {rounds['peft'][-1]:,.0f} tokens/s")
    ours_tps, theirs_tps = statistics.median(rounds["lmforge"]), statistics.median(rounds["peft"])
    print(
        f"LoRA training: lmforge {ours_tps:,.0f} vs transformers + PEFT {theirs_tps:,.0f} tokens/s = "
        f"{ours_tps / theirs_tps:.2f}x"
    )
    result = {
        "lmforge_tokens_per_s": ours_tps,
        "peft_tokens_per_s": theirs_tps,
        "ratio": ours_tps / theirs_tps,
        "rounds": rounds,
        "first_step_loss": {"lmforge": first[0], "peft": first[1]},
        "trainable_parameters": {"lmforge": trainable[0], "peft": trainable[1]},
    }
    if args.memory:
        memory = {}
        for suffix in ("", "+recompute"):
            for kind in ("full", "lora", "lora-int8"):
                memory[kind + suffix] = peak(args.model, kind + suffix, args.threads)
            for kind in ("lora", "lora-int8"):
                memory[f"{kind}{suffix}_share_of_full"] = memory[kind + suffix] / memory["full" + suffix]
            print(
                f"peak RSS{suffix or ''}: full fine-tuning {memory['full' + suffix]:,.0f} MB, LoRA fp32 base "
                f"{memory['lora' + suffix]:,.0f} MB ({memory[f'lora{suffix}_share_of_full']:.0%}), LoRA int8 base "
                f"{memory['lora-int8' + suffix]:,.0f} MB ({memory[f'lora-int8{suffix}_share_of_full']:.0%})"
            )
        result["peak_rss_mb"] = memory
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "model": args.model,
        "settings": {
            "batch": BATCH,
            "length": LENGTH,
            "rank": RANK,
            "alpha": ALPHA,
            "precision": "fp32",
            "steps_per_round": args.steps,
            "rounds": args.rounds,
        },
    }
    out = Path(args.out or RESULTS / f"lora_vs_peft-{Path(args.model).resolve().name}.json")
    out.write_text(json.dumps({"machine": machine, "result": result}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
