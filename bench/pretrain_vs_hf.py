"""Training throughput of lmforge vs Hugging Face transformers on the same architecture, weights and batch.

Cases: BERT MLM 32x128 and GPT-2 CLM 16x256 at d_model 256, 4 layers, 4 heads, vocab 21128, in fp32
and under bf16 autocast. One training step = forward + backward + AdamW step. Both sides run in
this process with the same allocator and thread count, interleaved (a round of lmforge steps,
then a round of transformers steps, repeated), and the medians are compared.

    python bench/pretrain_vs_hf.py [--rounds 6] [--steps 3] [--threads 2] [--compile] [--out FILE]

Writes bench/results/pretrain_vs_hf.json:
{"machine": {...}, "cases": {"<case>": {"lmforge": tokens/s, "hf": tokens/s, "unit": "tokens/s",
 "ratio": lmforge/hf, "settings": {...}}}}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from lmforge.models.convert import from_hf
from lmforge.models.registry import build_model
from lmforge.tasks.base import transformer_train_flops
from lmforge.tasks.clm import clm_loss, clm_train_flops
from lmforge.tasks.mlm import mlm_loss, mlm_train_flops
from lmforge.train.logging import measure_peak_flops

VOCAB, D, LAYERS, HEADS, FF = 21128, 256, 4, 4, 1024
RESULTS = Path(__file__).parent / "results" / "pretrain_vs_hf.json"


def _mlm_models():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = transformers.BertForMaskedLM(cfg)
    ours_cfg, state = from_hf(cfg.to_dict(), hf.state_dict())
    ours_cfg.pooler = False  # BertForMaskedLM has no pooler either
    ours = build_model(ours_cfg)
    ours.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler")})
    return ours, hf


def _clm_models():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=D,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FF,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(cfg)
    ours_cfg, state = from_hf(cfg.to_dict(), hf.state_dict())
    ours = build_model(ours_cfg)
    ours.load_state_dict(state)
    return ours, hf


def _mlm_batches(B: int = 32, T: int = 128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    selected = torch.rand(B, T, generator=g) < 0.15
    positions = selected.view(-1).nonzero().squeeze(1)
    labels = ids.view(-1)[positions]
    corrupted = ids.clone().view(-1)
    corrupted[positions] = 4
    ours = {"input_ids": corrupted.view(B, T), "positions": positions, "labels": labels, "n_targets": len(positions)}
    hf_labels = torch.full((B * T,), -100)
    hf_labels[positions] = labels
    return ours, {"input_ids": corrupted.view(B, T), "labels": hf_labels.view(B, T)}


def _clm_batches(B: int = 16, T: int = 256):
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))
    ours = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "n_targets": B * T}
    return ours, {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}  # transformers shifts labels itself


def _step_fns(kind: str, compile_blocks: bool = False):
    ours, hf = _mlm_models() if kind == "mlm" else _clm_models()
    if compile_blocks:  # what --train.compile does
        for layer in ours.layers:
            layer.compile(dynamic=True)
    ours_batch, hf_batch = _mlm_batches() if kind == "mlm" else _clm_batches()
    loss_fn = mlm_loss if kind == "mlm" else clm_loss
    # The same optimizer kernel on both sides (torch's fused AdamW, what lmforge uses), so the ratio
    # measures the models and losses.
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    ours.train()
    hf.train()

    def ours_step():
        out = loss_fn(ours, ours_batch)
        (out.loss_sum / ours_batch["n_targets"]).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def hf_step():
        hf(**hf_batch).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    tokens = ours_batch["input_ids"].numel()
    T = ours_batch["input_ids"].shape[1]
    flops_ours = (mlm_train_flops if kind == "mlm" else clm_train_flops)(ours.cfg, ours_batch)
    # transformers runs every layer and the vocabulary head at all B*T positions.
    flops_hf = transformer_train_flops(
        n_layers=LAYERS,
        d_model=D,
        d_ff=FF,
        n_tokens=tokens,
        seq_len=T,
        head_rows=tokens,
        head_flops_per_row=2 * D * VOCAB + (2 * D * D if kind == "mlm" else 0),
    )
    flops = (flops_ours, flops_hf)
    return ours_step, hf_step, tokens, flops, tuple(ours_batch["input_ids"].shape)


def _time(fn, steps: int, precision: str) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        with ctx:
            fn()
    return (time.perf_counter() - start) / steps


def run_case(kind: str, precision: str, *, rounds: int, steps: int, compile_blocks: bool = False) -> dict:
    ours_step, hf_step, tokens, flops, shape = _step_fns(kind, compile_blocks)
    _time(ours_step, 2, precision)  # warm-up both sides
    _time(hf_step, 2, precision)
    ours_t, hf_t = [], []
    for _ in range(rounds):
        ours_t.append(_time(ours_step, steps, precision))
        hf_t.append(_time(hf_step, steps, precision))
    ours_s, hf_s = statistics.median(ours_t), statistics.median(hf_t)
    peak = measure_peak_flops(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32)
    return {
        "lmforge": tokens / ours_s,
        "hf": tokens / hf_s,
        "unit": "tokens/s",
        "ratio": hf_s / ours_s,
        "settings": {
            "batch": list(shape),
            "d_model": D,
            "n_layers": LAYERS,
            "vocab_size": VOCAB,
            "precision": precision,
            "rounds": rounds,
            "steps_per_round": steps,
            "lmforge_compiled_blocks": compile_blocks,
            "lmforge_mfu": flops[0] / ours_s / peak,
            "hf_mfu": flops[1] / hf_s / peak,
            "lmforge_flops_per_step": flops[0],
            "hf_flops_per_step": flops[1],
            "peak_flops_per_s": peak,
            "lmforge_step_s": ours_t,
            "hf_step_s": hf_t,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="mlm-fp32,mlm-bf16,clm-fp32,clm-bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile lmforge's blocks (--train.compile)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {}
    for case in args.cases.split(","):
        kind, precision = case.split("-")
        cases[case] = run_case(kind, precision, rounds=args.rounds, steps=args.steps, compile_blocks=args.compile)
        c = cases[case]
        mfu = 100 * c["settings"]["lmforge_mfu"]
        line = f"{case:10s} lmforge {c['lmforge']:8,.0f}  transformers {c['hf']:8,.0f} tokens/s"
        line += f"  ratio {c['ratio']:.2f}x"
        print(f"{line}  lmforge MFU {mfu:.1f}%", flush=True)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "allocator": os.environ.get("LD_PRELOAD", "glibc malloc") or "glibc malloc",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "cases": cases}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
