"""Decoding speed of lmforge's ``Generator`` vs transformers' ``generate`` on the same GPT weights, per precision.

Both sides hold the same decoder (by default a GPT-2-style d_model 256, 4 layers, 4 heads, vocabulary 21128:
gpt-tiny with bert-base-chinese's vocabulary size; --model names an lmforge GPT directory of any family, e.g. the
built-in SmolLM2 or gemma-3-270m, which transformers then runs as its own Llama / Gemma 3 class),
in this process, with the same thread count and allocator. Greedy decoding of 128 new tokens from
a 16-token prompt, at batch 1 and batch 8; rounds alternate (lmforge, then transformers) and the
medians are compared. transformers runs the family's class's ``generate`` in fp32 with its defaults (dynamic
KV cache). Before timing, lmforge's fp32 token ids are checked to be identical to transformers', so the
two decode the very same sequences.

Precisions (``models/decoding.py``): ``fp32`` (exact), ``int8`` (every matrix int8 weight-only, bf16 inputs),
``int8-head`` (the vocabulary matrix alone), ``bf16`` (everything in bf16); the inexact three only where bf16
arithmetic is fast (``--precisions`` defaults to the ones this machine runs). Each case also reports the
weight bytes read per decoding step, that rate as a share of this machine's measured read bandwidth (a 512 MB
fp32 sum, best of 5), and for the inexact paths the share of greedy tokens equal to lmforge fp32's over 128
new tokens from 20 prompts (the first 16 tokens of 20 ``pretrain-zh`` texts with --model, else random ids;
random weights make near-ties common, so agreement is only meaningful on a trained model).

    python bench/generate_vs_hf.py [--rounds 5] [--threads 2] [--new-tokens 128] [--model DIR]
        [--precisions fp32 int8 int8-head bf16] [--out FILE]

Writes bench/results/generate_vs_hf.json in the shape of the other benchmarks:
{"machine": {...}, "cases": {"batch1": {"lmforge", "hf", "unit", "ratio", "settings"}, "batch8": {...},
"int8-head-batch1": {..., "token_agreement"}, ...}} (the fp32 cases keep their old names).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from lmforge.data.tokenizer import LMTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.inference.generate import GenerationConfig, Generator
from lmforge.models.convert import to_hf
from lmforge.models.decoding import PRECISIONS, resolve_precision
from lmforge.models.gpt import GPT
from lmforge.models.registry import load_model
from lmforge.models.sizes import model_size

RESULTS = Path(__file__).parent / "results" / "generate_vs_hf.json"
PROMPT_LEN = 16


class _IdsOnly(LMTokenizer):
    """A stand-in tokenizer for random weights: ids in, ids out (the benchmark never reads text)."""

    def __init__(self, eos: int) -> None:
        self.kind, self.specials, self._eos = "bpe", {}, eos

    def token_id(self, role: str) -> int | None:
        return self._eos if role == "eos" else None

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _models(model_dir: str | None) -> tuple[GPT, LMTokenizer, transformers.PreTrainedModel]:
    if model_dir:
        ours = load_model(model_dir)
        if not isinstance(ours, GPT):
            raise SystemExit(f"{model_dir}: not a GPT model directory")
        tok = load_tokenizer(model_dir)
    else:
        torch.manual_seed(0)
        ours = GPT(model_size("gpt-tiny", vocab_size=21128)).eval()
        tok = _IdsOnly(eos=0)
    eos = tok.token_id("eos")
    hf_cfg, hf_state = to_hf(ours.cfg, ours.state_dict(), token_ids={"eos": eos, "bos": eos, "pad": eos})
    kind = hf_cfg.pop("model_type")
    hf_cfg = {k: v for k, v in hf_cfg.items() if k != "architectures"}
    # the family's own transformers class (GPT-2, Llama, Qwen2, Gemma 3) from the exported config
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(kind, **hf_cfg))
    hf.load_state_dict(hf_state, strict=False)  # attention bias buffers are not weights
    hf.tie_weights()
    return ours, tok, hf.eval()


def _prompts(batch: int, vocab: int, eos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, PROMPT_LEN), generator=g)
    return ids.masked_fill(ids == eos, 1)


def _run_ours(gen: Generator, prompts: torch.Tensor, cfg: GenerationConfig) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = gen.generate(prompts.tolist(), cfg)
    return time.perf_counter() - start, [o.token_ids for o in out]


def _run_hf(hf, prompts: torch.Tensor, new_tokens: int, eos: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    seconds = time.perf_counter() - start
    rows = []
    for row in out[:, prompts.shape[1] :].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return seconds, rows


def _read_bandwidth() -> float:
    """Bytes/s of reading a 512 MB fp32 tensor (sum), best of 5: this machine's memory read rate."""
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def _step_bytes(gen: Generator) -> int:
    """Weight bytes one decoding step reads: every layer's matrices and vectors, and the vocabulary matrix once
    (the token and position tables are read a row per sequence: not counted)."""
    tensors = [*gen.model.named_parameters(), *gen.model.named_buffers()]  # int8 layers hold buffers
    layers = sum(t.numel() * t.element_size() for n, t in tensors if not n.startswith(("embed.", "rotary.")))
    head = gen.head
    if head.quantized:
        return layers + head.int8.numel() + head.scale.numel() * head.scale.element_size()
    return layers + head.weight.numel() * head.weight.element_size()


def _agreement(exact: list[list[int]], fast: list[list[int]]) -> float:
    """Share of positions where two greedy continuations agree (a row counts up to its shorter length and the
    longer's extra tokens count as disagreements)."""
    same = sum(sum(a == b for a, b in zip(x, y, strict=False)) for x, y in zip(exact, fast, strict=True))
    return same / max(sum(max(len(x), len(y)) for x, y in zip(exact, fast, strict=True)), 1)


def _agreement_prompts(model_dir: str | None, tok, vocab: int, eos: int) -> list[list[int]]:
    if model_dir:
        from lmforge.data.builtin import load_builtin

        texts = [ex["text"] for ex in load_builtin("pretrain-zh")["train"][:200]]
        ids = [tok.encode(t)[:PROMPT_LEN] for t in texts]
        return [p for p in ids if len(p) == PROMPT_LEN][:20]
    return _prompts(20, vocab, eos).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="an lmforge GPT directory (default: random gpt-tiny)")
    parser.add_argument("--precisions", nargs="*", default=None, choices=PRECISIONS, help="default: what runs here")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, tok, hf = _models(args.model)
    precisions = args.precisions or [p for p in PRECISIONS if _runs_here(p)]
    gens = {p: Generator(ours, tok, precision=p) for p in precisions}
    exact = gens.get("fp32") or Generator(ours, tok)
    eos = exact.eos_id
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    bandwidth = _read_bandwidth()
    agree_prompts = _agreement_prompts(args.model, tok, ours.cfg.vocab_size, eos)
    reference = [o.token_ids for o in exact.generate(agree_prompts, cfg)]
    cases = {}
    for batch in (1, 8):
        prompts = _prompts(batch, ours.cfg.vocab_size, eos)
        _, mine = _run_ours(exact, prompts, cfg)  # warm-up, and the parity check
        _, theirs = _run_hf(hf, prompts, args.new_tokens, eos)
        if mine != theirs:
            raise SystemExit(f"batch {batch}: lmforge and transformers decoded different tokens")
        n_hf = sum(len(r) for r in theirs)
        for gen in gens.values():
            _run_ours(gen, prompts, cfg)  # warm-up
        rounds: dict[str, list[float]] = {p: [] for p in gens}
        hf_rounds: list[float] = []
        for _ in range(args.rounds):
            for p, gen in gens.items():
                seconds, out = _run_ours(gen, prompts, cfg)
                rounds[p].append(sum(len(r) for r in out) / seconds)
            hf_rounds.append(n_hf / _run_hf(hf, prompts, args.new_tokens, eos)[0])
        ref = statistics.median(hf_rounds)
        for p, gen in gens.items():
            lm = statistics.median(rounds[p])
            step_bytes = _step_bytes(gen)
            steps_per_s = lm / batch
            case = {
                "lmforge": lm,
                "hf": ref,
                "unit": "new tokens/s",
                "ratio": lm / ref,
                "precision": p,
                "weight_bytes_per_step": step_bytes,
                "weight_bytes_per_token": step_bytes / batch,
                "bandwidth_share": step_bytes * steps_per_s / bandwidth,
                "settings": {
                    "batch": batch,
                    "prompt_tokens": PROMPT_LEN,
                    "new_tokens": args.new_tokens,
                    "decoding": "greedy",
                    "rounds": args.rounds,
                    "lmforge_rounds": rounds[p],
                    "hf_rounds": hf_rounds,
                },
            }
            if p != "fp32":
                case["token_agreement"] = _agreement(reference, [o.token_ids for o in gen.generate(agree_prompts, cfg)])
                case["agreement_settings"] = {"prompts": len(agree_prompts), "new_tokens": args.new_tokens}
            cases[f"batch{batch}" if p == "fp32" else f"{p}-batch{batch}"] = case
            agree = f", tokens equal to fp32 {case['token_agreement']:.1%}" if "token_agreement" in case else ""
            print(
                f"{p} batch {batch}: lmforge {lm:,.0f} vs transformers {ref:,.0f} new tokens/s = {lm / ref:.2f}x; "
                f"{step_bytes / 1e6:.1f} MB per step, {case['bandwidth_share']:.0%} of {bandwidth / 1e9:.1f} GB/s"
                f"{agree}"
            )
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "allocator": "glibc malloc" if "libtcmalloc" not in os.environ.get("LD_PRELOAD", "") else "tcmalloc",
        "model": args.model or "random gpt-tiny (4 x 256, vocab 21128)",
        "read_bandwidth_gb_s": bandwidth / 1e9,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "cases": cases}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def _runs_here(precision: str) -> bool:
    try:
        resolve_precision(precision, torch.device("cpu"))
    except UserError:
        return False
    return True


if __name__ == "__main__":
    main()
