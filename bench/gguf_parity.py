"""A built-in GGUF checkpoint through lmforge and through transformers' own GGUF reader: the same token ids, logits
and greedy tokens?

Converts ``--builtin`` (default smollm2-135m-instruct) with ``lmforge convert``, loads the same GGUF file with
``transformers.AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` and its tokenizer, and compares, in fp32
with 2 threads: token ids on mixed Chinese / English / digits / emoji / full-width text and ChatML; the largest
logit difference on a prompt; greedy tokens from lmforge's ``Generator`` (KV cache, the decoding path every
command uses) against transformers' ``generate`` (up to 64, both stopping at the end token); and the
conversion's and loading's peak memory against the fp32 weights.

    python bench/gguf_parity.py [--builtin smollm2-135m-instruct] [--out bench/results/gguf_parity.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "gguf_parity.json"
TEXTS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。机器学习",
    "Numbers 12345, 3.14159 and 2026-12-07; emoji 😀🚀; full-width ＡＢＣ１２３！",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\tand tabs\n\nnew lines",
]
PROMPT = "The history of the Roman Empire is"


def convert(name: str, out: Path) -> dict:
    """Convert in a child process and read its peak resident memory (the parent's would include transformers)."""
    code = (
        "import json, resource, sys; from lmforge.rundir.convert import convert_builtin; "
        f"r = convert_builtin({name!r}, {str(out)!r}); "
        "print(json.dumps({'report': r, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_peak(directory: Path) -> float:
    """Peak resident memory (MB) of a child process that loads the converted model, and of one that only imports."""
    code = (
        "import resource, torch; from lmforge.models.registry import load_model; "
        f"m = load_model({str(directory)!r}); sum(float(p.sum()) for p in m.parameters()); "  # every page touched
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    code = "import resource, torch, lmforge.rundir.convert; "
    code += "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builtin", default="smollm2-135m-instruct")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import transformers

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.inference.config import GenerationConfig
    from lmforge.inference.generate import Generator
    from lmforge.models.checkpoints import checkpoint_path
    from lmforge.models.registry import load_model

    torch.set_num_threads(2)
    source = checkpoint_path(args.builtin)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        converted = convert(args.builtin, out)
        loaded_peak, baseline = load_peak(out), baseline_rss()
        link = Path(tmp) / "hf"
        link.mkdir()
        (link / "model.gguf").symlink_to(source)
        tok, model = load_tokenizer(out), load_model(out).eval()
        ref_tok = transformers.AutoTokenizer.from_pretrained(str(link), gguf_file="model.gguf")
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(link), gguf_file="model.gguf", dtype=torch.float32)
        ref.eval()
        ids_equal = {
            text: tok.encode(text, special_tokens=False) == ref_tok(text, add_special_tokens=False)["input_ids"]
            for text in TEXTS
        }
        prompt = tok.encode(PROMPT)  # with what the tokenizer adds (Gemma's <bos>), as generate does
        with torch.no_grad():
            diff = (model(torch.tensor([prompt])) - ref(torch.tensor([prompt])).logits).abs().max().item()
            # no min_new_tokens: it would forbid <eos> and so change the greedy choice wherever <eos> is the best
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        theirs = theirs[0, len(prompt) :].tolist()
        cfg = GenerationConfig(max_new_tokens=64, do_sample=False, stop_token_ids=[])
        generator = Generator(model, tok)
        ours = list(generator.generate([prompt], cfg)[0].token_ids)
    fp32_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    result = {
        "machine": platform.processor() or platform.machine(),
        "checkpoint": args.builtin,
        "token_ids_equal": ids_equal,
        "max_abs_logit_difference": diff,
        "greedy_tokens_compared": len(theirs),
        "greedy_equal": ours == theirs,
        "greedy_first_difference": next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None
        ),
        "greedy_text": tok.decode(ours),
        "fp32_weights_mb": round(fp32_mb),
        "python_torch_lmforge_baseline_rss_mb": round(baseline),
        "conversion_peak_rss_mb": round(converted["peak_rss_mb"]),
        "conversion_peak_over_weights": round(converted["peak_rss_mb"] / fp32_mb, 2),
        "load_peak_rss_mb": round(loaded_peak),
        "load_peak_over_weights": round(loaded_peak / fp32_mb, 2),
        "parent_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
