"""``lmforge translate``: translate a file with a run directory from ``lmforge finetune translate``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from lmforge.commands._console import console
from lmforge.errors import UserError


@dataclass
class Config:
    """Translate a file with a run directory from `lmforge finetune translate`."""

    model: str
    """Run directory."""
    input: str
    """.txt (one source per line), .tsv (first column) or .jsonl (the source language field or 'src')."""
    output: str
    """JSONL, one {"src", "translation"} per input line (plus "tgt" when the input has references)."""
    num_beams: int = 4
    """Beam size; 1 = greedy."""
    length_penalty: float = 1.0
    """Beam search length penalty."""
    max_new_tokens: int | None = None
    """Longest translation in tokens; None = the model's max_len."""
    batch_size: int = 64
    """Sentences x beams decoded together."""
    skip_bad_rows: bool = False
    """Skip malformed lines instead of stopping at the first."""

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.batch_size < 1:
            raise UserError(f"--num-beams {self.num_beams} / --batch-size {self.batch_size}: each must be >= 1")
        if not math.isfinite(self.length_penalty):
            raise UserError(f"--length-penalty {self.length_penalty}: must be a finite number")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")


def translate(cfg: Config) -> dict:
    """Translate ``cfg.input`` into ``cfg.output``; returns counts, time and (with references) BLEU / chrF."""
    import torch

    from lmforge.data.readers import read_pairs, write_jsonl
    from lmforge.inference.config import GenerationConfig
    from lmforge.metrics import translation_metrics
    from lmforge.rundir import load_run
    from lmforge.rundir.layout import check_output_files

    check_output_files([cfg.output], inputs=[cfg.input])
    run = load_run(cfg.model, task="translate")
    task, model = run.task, run.model
    examples, _ = read_pairs(
        cfg.input, src=task.src_lang, tgt=task.tgt_lang, skip_bad_rows=cfg.skip_bad_rows, need_target=False
    )
    if not examples:
        raise UserError(f"{cfg.input}: nothing to translate")
    task.eval_batch_size = cfg.batch_size
    gen = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens or task.max_len, num_beams=cfg.num_beams, length_penalty=cfg.length_penalty
    )
    started = time.perf_counter()
    with torch.inference_mode():
        hyps = task.translate(model, [ex["src"] for ex in examples], device=torch.device("cpu"), generation=gen)
    seconds = time.perf_counter() - started
    rows = [
        {**{k: v for k, v in ex.items() if k != "source"}, "translation": h}
        for ex, h in zip(examples, hyps, strict=True)
    ]
    write_jsonl(cfg.output, rows)
    summary = {"sentences": len(rows), "seconds": seconds}
    if all("tgt" in ex for ex in examples):
        summary.update(translation_metrics(hyps, [ex["tgt"] for ex in examples], target_lang=task.tgt_lang))
    return summary


def run(cfg: Config) -> None:
    s = translate(cfg)
    text = f"[green]wrote[/green] {s['sentences']} translations to {cfg.output} in {s['seconds']:.1f} s"
    if "bleu" in s:
        text += f"; BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f} against the references ({s['bleu_signature']})"
    console.print(text)
