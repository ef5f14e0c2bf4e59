"""Decoding speed of lmforge's ``Generator`` vs transformers' ``generate`` on the same GPT weights.

Both sides hold the same GPT-2-style decoder (d_model 256, 4 layers, 4 heads, vocabulary 21128:
gpt-tiny with bert-base-chinese's vocabulary size, unless --model names an lmforge GPT directory),
in this process, with the same thread count and allocator. Greedy decoding of 128 new tokens from
a 16-token prompt, at batch 1 and batch 8; rounds alternate (lmforge, then transformers) and the
medians are compared. transformers runs ``GPT2LMHeadModel.generate`` with its defaults (dynamic KV
cache). Before timing, both sides' token ids are checked to be identical, so the two decode the
very same sequences.

    python bench/generate_vs_hf.py [--rounds 5] [--threads 2] [--new-tokens 128] [--model DIR] [--out FILE]

Writes bench/results/generate_vs_hf.json in the shape of the other benchmarks:
{"machine": {...}, "cases": {"batch1": {"lmforge", "hf", "unit", "ratio", "settings"}, "batch8": {...}}}
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
from lmforge.inference.generate import GenerationConfig, Generator
from lmforge.models.convert import to_hf
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


def _models(model_dir: str | None) -> tuple[GPT, LMTokenizer, transformers.GPT2LMHeadModel]:
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
    hf_cfg = {k: v for k, v in hf_cfg.items() if k != "architectures"}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="an lmforge GPT directory (default: random gpt-tiny)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, tok, hf = _models(args.model)
    gen = Generator(ours, tok)
    eos = gen.eos_id
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    cases = {}
    for batch in (1, 8):
        prompts = _prompts(batch, ours.cfg.vocab_size, eos)
        _, mine = _run_ours(gen, prompts, cfg)  # warm-up, and the parity check
        _, theirs = _run_hf(hf, prompts, args.new_tokens, eos)
        if mine != theirs:
            raise SystemExit(f"batch {batch}: lmforge and transformers decoded different tokens")
        n_tokens = sum(len(r) for r in mine)
        ours_rounds, hf_rounds = [], []
        for _ in range(args.rounds):
            ours_rounds.append(n_tokens / _run_ours(gen, prompts, cfg)[0])
            hf_rounds.append(n_tokens / _run_hf(hf, prompts, args.new_tokens, eos)[0])
        lm, ref = statistics.median(ours_rounds), statistics.median(hf_rounds)
        cases[f"batch{batch}"] = {
            "lmforge": lm,
            "hf": ref,
            "unit": "new tokens/s",
            "ratio": lm / ref,
            "settings": {
                "batch": batch,
                "prompt_tokens": PROMPT_LEN,
                "new_tokens": args.new_tokens,
                "generated_tokens": n_tokens,
                "decoding": "greedy",
                "rounds": args.rounds,
                "lmforge_rounds": ours_rounds,
                "hf_rounds": hf_rounds,
            },
        }
        print(f"batch {batch}: lmforge {lm:,.0f} vs transformers {ref:,.0f} new tokens/s = {lm / ref:.2f}x")
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "allocator": "glibc malloc" if "libtcmalloc" not in os.environ.get("LD_PRELOAD", "") else "tcmalloc",
        "model": args.model or "random gpt-tiny (4 x 256, vocab 21128)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "cases": cases}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
