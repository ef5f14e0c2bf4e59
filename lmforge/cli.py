"""The ``lmforge`` command: command name -> config dataclass -> function. No logic lives here.

Arguments are parsed by tyro from the config dataclasses (their field docstrings are the
``--help`` text). Every command also takes ``--config RECIPE.yaml``: the recipe is validated
strictly (unknown keys and bad values fail naming the file and key) and becomes the defaults
that command-line flags then override, e.g. ``--vocab-size 8000`` or ``--model.d-model 256``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro
from rich.console import Console
from rich.table import Table

from lmforge.chat import ChatConfig, ChatTrainConfig, GenerateConfig
from lmforge.config import from_dict, read_yaml
from lmforge.data import builtin
from lmforge.data.shards import PrepareConfig, prepare
from lmforge.data.tokenizer import TokenizerTrainConfig, train_command
from lmforge.embed import EmbedConfig, EmbedTrainConfig
from lmforge.finetune import ClassifyConfig, EvaluateConfig, NERConfig, PredictConfig
from lmforge.interop import ConvertConfig, ExportConfig, convert_from_hf, export_to_hf
from lmforge.translate import TranslateConfig, TranslateTrainConfig

console = Console()


@dataclass
class DataListConfig:
    """List the built-in corpora with their split sizes."""

    path: str | None = None
    """Tatoeba TSV for tatoeba-cmn-en (else $LMFORGE_TATOEBA)."""


@dataclass
class DataExportConfig:
    """Write a built-in corpus's splits as JSONL / CoNLL / TSV files, the formats users bring."""

    name: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="NAME")]]
    """Built-in corpus name (see `lmforge data list`)."""
    out: str
    """Directory to write train/dev/test files into."""
    path: str | None = None
    """Tatoeba TSV for tatoeba-cmn-en (else $LMFORGE_TATOEBA)."""


def _tokenizer_train(cfg: TokenizerTrainConfig) -> None:
    tok = train_command(cfg)
    console.print(f"[green]wrote[/green] {cfg.out}: {cfg.kind} tokenizer, {tok.vocab_size} tokens")


def _convert(cfg: ConvertConfig) -> None:
    out = convert_from_hf(cfg)
    console.print(f"[green]wrote[/green] lmforge model directory {out}")


def _export(cfg: ExportConfig) -> None:
    out = export_to_hf(cfg)
    console.print(f"[green]wrote[/green] Hugging Face model directory {out}")


def _data_list(cfg: DataListConfig) -> None:
    table = Table(title="Built-in corpora")
    for col in ("name", "task", "train", "dev", "test", "source"):
        table.add_column(col, justify="right" if col in ("train", "dev", "test") else "left")
    for name, b in builtin.BUILTINS.items():
        try:
            splits = builtin.load_builtin(name, path=cfg.path)
            sizes = [f"{len(splits[s]):,}" for s in builtin.SPLITS]
        except ValueError as e:
            sizes = ["-", "-", "-"]
            console.print(f"[yellow]{name}[/yellow]: {e}")
        table.add_row(name, b.task, *sizes, b.source)
    console.print(table)


def _data_export(cfg: DataExportConfig) -> None:
    written = builtin.export_builtin(cfg.name, cfg.out, path=cfg.path)
    for split, path in written.items():
        console.print(f"[green]wrote[/green] {split}: {path}")


def _prepare(cfg: PrepareConfig) -> None:
    out = prepare(cfg)
    console.print(f"[green]token shards ready[/green] in {out}")


def _pretrain(cfg: Any) -> None:
    from lmforge.pretrain import pretrain

    summary = pretrain(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the first process reports
        return
    best = summary["best_val_loss"]
    minutes = summary["seconds"] / 60
    text = f"[green]done[/green]: {summary['steps']} steps, {summary['tokens']:,} tokens in {minutes:.1f} min"
    if best is not None:
        text += f", best validation loss {best:.4f}"
    console.print(f"{text}; model directory {cfg.out}")


def _pretrain_config() -> type:
    from lmforge.pretrain import PretrainConfig

    return PretrainConfig


def _demo_config() -> type:
    from lmforge.demo import DemoConfig

    return DemoConfig


def _finetune(kind: str) -> Callable[[Any], None]:
    def run(cfg: Any) -> None:
        from lmforge.finetune import finetune

        results = finetune(cfg, kind)
        if os.environ.get("RANK", "0") != "0":
            return
        _metrics_table(f"{kind}: {cfg.out}", {s: results[s] for s in ("dev", "test") if s in results})
        console.print(f"[green]done[/green] in {results['wall_seconds'] / 60:.1f} min; run directory {cfg.out}")

    return run


def _metrics_table(title: str, by_split: dict[str, dict]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    for split in by_split:
        table.add_column(split, justify="right")
    first = next(iter(by_split.values()), {})
    for key in ("accuracy", "macro_f1", "f1", "precision", "recall", "loss"):
        if key in first:
            table.add_row(key, *(f"{m[key]:.4f}" for m in by_split.values()))
    per = "per_type" if "per_type" in first else "per_class"
    for name in first.get(per, {}):
        table.add_row(f"{name} F1", *(f"{m[per][name]['f1']:.4f}" for m in by_split.values()))
    console.print(table)


def _evaluate(cfg: Any) -> None:
    from lmforge.finetune import evaluate_command

    _metrics_table(f"{cfg.model} on {cfg.data}", {"score": evaluate_command(cfg)})
    if cfg.output:
        console.print(f"[green]wrote[/green] {cfg.output}")


def _demo(cfg: Any) -> None:
    from lmforge.demo import run_demo

    summary = run_demo(cfg)
    table = Table(title=f"lmforge demo: test scores ({cfg.out}/results.json, {cfg.out}/report.md)")
    for col in ("task", "metric", "pretrained", "scratch", "baseline"):
        table.add_column(col, justify="left" if col in ("task", "metric", "baseline") else "right")
    for data, systems in summary["tasks"].items():
        baseline = next(s for s in systems if s not in ("pretrained", "scratch"))
        for key in (
            ("accuracy", "macro_f1") if "accuracy" in systems["pretrained"]["test"] else ("f1", "precision", "recall")
        ):
            values = [systems[s]["test"][key] for s in ("pretrained", "scratch", baseline)]
            table.add_row(data, key, f"{values[0]:.4f}", f"{values[1]:.4f}", f"{values[2]:.4f} ({baseline})")
    console.print(table)
    console.print(f"total wall time {summary['wall_seconds']['total'] / 60:.1f} min")


def _compare_config() -> type:
    from lmforge.compare import CompareConfig

    return CompareConfig


def _compare(cfg: Any) -> None:
    from lmforge.compare import run_compare

    summary = run_compare(cfg)
    rows = []
    for name, s in summary["summary"].items():
        cells = [f"{s[data]['mean']:.4f} ± {s[data]['std']:.4f}" for data in ("reviews-sentiment", "peoples-daily-ner")]
        minutes = s.get("pretraining_minutes")
        rows.append((name, *cells, "-" if minutes is None else f"{minutes['mean']:.1f}"))
    b = summary["budget"]
    title = f"equal compute ({b['budget_flops'] / 1e15:.2f} PFLOPs each, {len(cfg.seeds)} seeds): {cfg.out}/report.md"
    _print_table(title, ("objective", "sentiment accuracy", "NER entity F1", "pretraining min"), rows)
    c = summary["claim"]
    if c:
        console.print(f"ELECTRA >= MLM on both tasks: {'holds' if c['electra_at_least_mlm'] else 'does not hold'}")


def _nas_config() -> type:
    from lmforge.nas.command import NASConfig

    return NASConfig


def _nas(cfg: Any) -> None:
    from lmforge.nas.command import run_nas

    found = run_nas(cfg)
    metric = found["metric"]
    if "supernet" in found:
        rows = [
            (r["arch"], f"{r['dev']:.4f}", f"{r['measured_ms']:.2f}", f"{r['predicted_ms']:.2f}", f"{r['params']:,}")
            for r in found["supernet"]["pareto"]
        ]
        _print_table(f"Pareto front ({cfg.out}/report.md, {cfg.out}/pareto.png)",
                     ("architecture", f"dev {metric}", "measured ms", "predicted ms", "params"), rows)  # fmt: skip
    if "retrained" in found:
        rows = []
        for label, r in found["retrained"].items():
            test = "-" if metric not in r["test"] else f"{r['test'][metric]:.4f}"
            rows.append((label, r["arch"], f"{r['measured_ms']:.2f}", f"{r['dev'][metric]:.4f}", test))
        _print_table(
            "retrained from scratch", ("pick", "architecture", "measured ms", f"dev {metric}", f"test {metric}"), rows
        )
    lat = found["latency_model"]
    console.print(f"latency model: median relative error {100 * lat['held_out_median_relative_error']:.1f}% on "
                  f"{len(lat['held_out'])} held-out architectures")  # fmt: skip


def _serve_config() -> type:
    from lmforge.serve.command import ServeConfig

    return ServeConfig


def _serve(cfg: Any) -> None:
    from lmforge.serve.command import serve

    serve(cfg)


def _print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table: the first column and a 'decoding' column left-aligned, the numbers right-aligned."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 or col == "decoding" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _finetune_translate(cfg: Any) -> None:
    from lmforge.translate import finetune_translate

    r = finetune_translate(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    rows = [("dev", f"{r['dev']['bleu']:.2f}", f"{r['dev']['chrf']:.2f}", "greedy")]
    if "test" in r:
        dec = r["test"]["decoding"]
        rows.append(("test", f"{r['test']['bleu']:.2f}", f"{r['test']['chrf']:.2f}",
                     f"beam {dec['num_beams']} ({dec['seconds']:.1f} s)"))  # fmt: skip
    _print_table(f"translate {cfg.src} -> {cfg.tgt}: {cfg.out}", ("split", "BLEU", "chrF", "decoding"), rows)
    console.print(f"[green]done[/green] in {r['wall_seconds'] / 60:.1f} min; run directory {cfg.out}")


def _translate(cfg: Any) -> None:
    from lmforge.translate import translate_command

    s = translate_command(cfg)
    text = f"[green]wrote[/green] {s['sentences']} translations to {cfg.output} in {s['seconds']:.1f} s"
    if "bleu" in s:
        text += f"; BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f} against the references ({s['bleu_signature']})"
    console.print(text)


def _finetune_chat(cfg: Any) -> None:
    from lmforge.chat import finetune_chat

    r = finetune_chat(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    splits = [("dev (before)", r["before_finetuning"]["dev"]), ("dev", r["dev"])]
    splits += [("test", r["test"])] if "test" in r else []
    rows = [(name, f"{m['perplexity']:.2f}", f"{m['distinct_1']:.3f}", f"{m['distinct_2']:.3f}") for name, m in splits]
    _print_table(f"chat fine-tuning: {cfg.out}", ("split", "perplexity", "distinct-1", "distinct-2"), rows)
    console.print(f"[green]done[/green] in {r['wall_seconds'] / 60:.1f} min; chat with: lmforge chat --model {cfg.out}")


def _finetune_embed(cfg: Any) -> None:
    from lmforge.embed import finetune_embed

    r = finetune_embed(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    keys = [k for k in ("knn_accuracy", "spearman", "alignment", "uniformity") if k in r.get("dev", {})]
    rows = []
    for split in ("dev", "test"):
        for label, m in ((f"{split} (before)", r["before_finetuning"].get(split)), (split, r.get(split))):
            if m:
                rows.append((label, *(f"{m[k]:.4f}" for k in keys)))
    _print_table(f"SimCSE: {cfg.out}", ("split", *keys), rows)
    console.print(f"[green]done[/green] in {r['wall_seconds'] / 60:.1f} min; run directory {cfg.out}")


def _embed(cfg: Any) -> None:
    from lmforge.embed import embed_command

    path, n = embed_command(cfg)
    console.print(f"[green]wrote[/green] {n} vectors to {path} (ids in {cfg.output}.ids.txt)")


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _generate(cfg: Any) -> None:
    from lmforge.chat import generate_command

    generate_command(cfg, _write_stdout)
    _write_stdout("\n")


def _chat(cfg: Any) -> None:
    from lmforge.chat import chat_loop

    def read() -> str:
        _write_stdout("you: ")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    chat_loop(cfg, read, _write_stdout)


def _predict(cfg: Any) -> None:
    from lmforge.finetune import predict_command

    n = predict_command(cfg)
    console.print(f"[green]wrote[/green] {n} predictions to {cfg.output}")


COMMANDS: dict[str, tuple[type, Callable[[Any], None]]] = {
    "tokenizer train": (TokenizerTrainConfig, _tokenizer_train),
    "prepare": (PrepareConfig, _prepare),
    "pretrain": (_pretrain_config(), _pretrain),
    "finetune classify": (ClassifyConfig, _finetune("classify")),
    "finetune ner": (NERConfig, _finetune("ner")),
    "finetune translate": (TranslateTrainConfig, _finetune_translate),
    "finetune chat": (ChatTrainConfig, _finetune_chat),
    "finetune embed": (EmbedTrainConfig, _finetune_embed),
    "evaluate": (EvaluateConfig, _evaluate),
    "predict": (PredictConfig, _predict),
    "translate": (TranslateConfig, _translate),
    "generate": (GenerateConfig, _generate),
    "chat": (ChatConfig, _chat),
    "embed": (EmbedConfig, _embed),
    "demo": (_demo_config(), _demo),
    "compare": (_compare_config(), _compare),
    "nas": (_nas_config(), _nas),
    "serve": (_serve_config(), _serve),
    "convert": (ConvertConfig, _convert),
    "export": (ExportConfig, _export),
    "data list": (DataListConfig, _data_list),
    "data export": (DataExportConfig, _data_export),
}


def _usage() -> None:
    console.print("usage: lmforge COMMAND [--config RECIPE.yaml] [OPTIONS]   (lmforge COMMAND --help for options)\n")
    table = Table(show_header=False, box=None)
    for name, (cls, _) in COMMANDS.items():
        table.add_row(f"  lmforge {name}", (cls.__doc__ or "").strip().splitlines()[0])
    console.print(table)


def _recipe_defaults(cls: type, path: str) -> Any:
    """The recipe at ``path`` as a ``cls`` instance; required fields it leaves out stay required."""
    data = read_yaml(path)
    absent = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
    placeholders = {name: _placeholder(cls, name, path) for name in absent}
    cfg = from_dict(cls, {**data, **placeholders}, where=path)
    for name in absent:
        object.__setattr__(cfg, name, tyro.MISSING)
    return cfg


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _placeholder(cls: type, name: str, path: str) -> Any:
    hint = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    if "list" in hint:
        return []
    if "str" in hint:
        return ""
    raise ValueError(f"{path}: the recipe must set {name!r}")


def _expand_resume(args: list[str]) -> list[str]:
    """``--resume RUN_DIR`` continues a run: its config.yaml becomes the recipe and --out RUN_DIR is implied."""
    if "--resume" not in args:
        return args
    i = args.index("--resume")
    if i + 1 >= len(args) or args[i + 1].startswith("-"):
        raise ValueError("--resume needs the run directory")
    run_dir = args[i + 1]
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ValueError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
    extra = [] if "--out" in args else ["--out", run_dir]
    return ["--config", str(Path(run_dir) / "config.yaml"), *args, *extra]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = next((n for n in sorted(COMMANDS, key=len, reverse=True) if argv[: len(n.split())] == n.split()), None)
    if name is None:
        _usage()
        known = argv and argv[0] not in ("-h", "--help")
        if known:
            console.print(f"[red]error:[/red] unknown command {' '.join(argv[:2])!r}")
        return 2 if known or not argv else 0
    cls, fn = COMMANDS[name]
    rest = argv[len(name.split()) :]
    try:
        default = None
        rest = _expand_resume(rest)
        flag = next((f for f in ("--config", "-c") if f in rest), None)
        if flag:
            i = rest.index(flag)
            if i + 1 >= len(rest):
                raise ValueError(f"{flag} needs a YAML file")
            default = _recipe_defaults(cls, rest[i + 1])
            rest = rest[:i] + rest[i + 2 :]
        cfg = tyro.cli(cls, args=rest, prog=f"lmforge {name}", default=default)
        fn(cfg)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e.filename}: not found" if e.filename else f"[red]error:[/red] {e}")
        return 2
    except IsADirectoryError as e:
        console.print(f"[red]error:[/red] {e.filename}: is a directory; give a file")
        return 2
    except OSError as e:  # permissions, a full disk, a vanished mount: the path and the system's reason
        console.print(f"[red]error:[/red] {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (the loop saved a checkpoint first)
        from lmforge.train.loop import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            console.print(f"[yellow]stopped[/yellow] by {e}")
            return e.exit_code
        console.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
