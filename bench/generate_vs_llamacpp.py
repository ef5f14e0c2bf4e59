"""Prefill and decoding speed of lmforge against llama.cpp and transformers on the same real model, batch 1.

The model is an lmforge model directory (``--model``, e.g. ``lmforge convert --builtin smollm2-135m-instruct``).
lmforge exports it to GGUF at F16, Q8_0 and Q4_0 (``lmforge export --to gguf``), and llama.cpp (the prebuilt
``xllamacpp`` wheel of the dev extra, its native server on a loopback port: ``tests/models/llamacpp.py``) runs
each file; transformers runs the same weights as its own class of the family (``generate_vs_hf._models``). Every
engine gets the same 512 token ids as its prompt (the start of ``docs/en``'s pages, tokenized by the model's
tokenizer) and decodes greedily 128 new tokens, the end token not stopping any of them (llama.cpp's
``ignore_eos``, transformers' ``min_new_tokens``, lmforge's ``Generator`` with no end id). 2 threads each, one
engine at a time, rounds interleaved (each llama.cpp file loaded for its turn and released after it, so that no
idle thread pool runs beside another engine), medians reported.

- prefill tokens/s: 512 / the time to the first new token (llama.cpp: its own ``prompt_per_second``; lmforge and
  transformers: a call with one new token);
- decode tokens/s: (128 - 1) / (the time of the whole call - that first call) (llama.cpp: ``predicted_per_second``);
- bytes read per new token: every matrix and vector of the blocks plus the output matrix once (the embedding table
  is read one row per token, unless it is the output matrix); as a share of the machine's read bandwidth
  (``generate_vs_hf._read_bandwidth``).

lmforge's precisions: fp32, and int8 / bf16 where ``models/decoding.resolve_precision`` runs them here.

    python bench/generate_vs_llamacpp.py --model runs/smollm2 [--rounds 3] [--threads 2] [--out FILE]

Writes bench/results/generate_vs_llamacpp-<model directory name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from generate_vs_hf import _models, _read_bandwidth, _step_bytes

from lmforge.cli import main as lmforge
from lmforge.errors import UserError
from lmforge.inference.generate import GenerationConfig, Generator
from lmforge.models.decoding import resolve_precision
from lmforge.models.gguf import open_gguf
from tests.models.llamacpp import LlamaCpp

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS, NEW_TOKENS = 512, 128
QUANTS = ("f16", "q8_0", "q4_0")


def prompt_ids(tok) -> list[int]:
    pages = sorted((Path(__file__).parents[1] / "docs" / "en").rglob("*.md"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in pages)
    ids = tok.encode(text)[:PROMPT_TOKENS]
    if len(ids) < PROMPT_TOKENS:
        raise SystemExit(f"docs/en gives only {len(ids)} tokens")
    return ids


def time_lmforge(gen: Generator, ids: list[int]) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    gen.generate([ids], GenerationConfig(max_new_tokens=1))
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = gen.generate([ids], GenerationConfig(max_new_tokens=NEW_TOKENS))[0].token_ids
    whole = time.perf_counter() - start
    return PROMPT_TOKENS / first, (len(out) - 1) / (whole - first), out


def time_transformers(hf, ids: list[int]) -> tuple[float, float]:
    prompt = torch.tensor([ids])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    first, whole = run(1), run(NEW_TOKENS)
    return PROMPT_TOKENS / first, (NEW_TOKENS - 1) / (whole - first)


def time_llamacpp(path: Path, ids: list[int], threads: int) -> tuple[float, float, list[int]]:
    server = LlamaCpp(path, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, threads=threads)
    try:
        reply = server.complete(ids, NEW_TOKENS)
    finally:
        server.close()
    timings = reply["timings"]
    return timings["prompt_per_second"], timings["predicted_per_second"], reply["tokens"]


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the file's tensors one new token reads: all but the embedding table, unless it is the output."""
    tensors = open_gguf(path).tensors
    tied = "output.weight" not in tensors
    return sum(int(t.n_bytes) for name, t in tensors.items() if tied or name != "token_embd.weight")


def agreement(a: list[int], b: list[int]) -> int:
    """How many first tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an lmforge decoder directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, tok, hf = _models(args.model)
    ids = prompt_ids(tok)
    precisions = ["fp32"]
    for p in ("int8", "bf16"):
        try:
            precisions.append(resolve_precision(p, torch.device("cpu")))
        except UserError as e:  # refused here: said on the console
            print(f"lmforge {p}: not run here ({e})")
    gens = {p: Generator(ours, tok, precision=p) for p in precisions}
    for gen in gens.values():
        gen.eos_id = -1  # the end token stops no engine
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    files = {}
    for quant in QUANTS:
        files[quant] = work / f"model-{quant}.gguf"
        assert lmforge(["export", args.model, "--to", "gguf", "--quant", quant, "--out", str(files[quant])]) == 0
    bandwidth = _read_bandwidth()
    engines = [*(f"lmforge {p}" for p in gens), *(f"llama.cpp {q.upper()}" for q in QUANTS), "transformers fp32"]
    prefill: dict[str, list[float]] = {e: [] for e in engines}
    decode: dict[str, list[float]] = {e: [] for e in engines}
    tokens: dict[str, list[int]] = {}
    for gen in gens.values():  # warm-up
        gen.generate([ids[:16]], GenerationConfig(max_new_tokens=4))
    for r in range(args.rounds):
        for engine in engines:
            kind, _, what = engine.partition(" ")
            if kind == "lmforge":
                pre, dec, out = time_lmforge(gens[what], ids)
                tokens[engine] = out
            elif kind == "llama.cpp":
                pre, dec, out = time_llamacpp(files[what.lower()], ids, args.threads)
                tokens[engine] = out
            else:
                pre, dec = time_transformers(hf, ids)
            prefill[engine].append(pre)
            decode[engine].append(dec)
            print(f"round {r + 1} {engine}: prefill {pre:,.0f} tokens/s, decode {dec:,.1f} tokens/s", flush=True)
    step_bytes = {f"lmforge {p}": _step_bytes(gen) for p, gen in gens.items()}
    step_bytes["transformers fp32"] = step_bytes["lmforge fp32"]
    step_bytes.update({f"llama.cpp {q.upper()}": gguf_bytes_per_token(files[q]) for q in QUANTS})
    reference = tokens["lmforge fp32"]
    cases = {}
    for engine in engines:
        dec = statistics.median(decode[engine])
        cases[engine] = {
            "prefill_tokens_per_s": statistics.median(prefill[engine]),
            "decode_tokens_per_s": dec,
            "bytes_per_token": step_bytes[engine],
            "bandwidth_share": step_bytes[engine] * dec / bandwidth,
            "prefill_rounds": prefill[engine],
            "decode_rounds": decode[engine],
            "greedy_tokens_equal_to_lmforge_fp32": agreement(reference, tokens[engine]) if engine in tokens else None,
        }
    print(f"\n{'engine':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'MB/token':>9} {'bandwidth':>10} same-as-fp32")
    for engine, c in cases.items():
        same = c["greedy_tokens_equal_to_lmforge_fp32"]
        print(
            f"{engine:<20} {c['prefill_tokens_per_s']:>14,.0f} {c['decode_tokens_per_s']:>13,.1f} "
            f"{c['bytes_per_token'] / 1e6:>9,.0f} {c['bandwidth_share']:>10.0%} {'' if same is None else same}"
        )
    import xllamacpp

    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xllamacpp": xllamacpp.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "model": args.model,
        "settings": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": args.rounds, "batch": 1},
    }
    out = Path(args.out or RESULTS / f"generate_vs_llamacpp-{Path(args.model).resolve().name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "cases": cases}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
