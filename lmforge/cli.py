"""The ``lmforge`` command: command name -> config class and function ("module:name", imported lazily), parse, call.

The per-task commands (``finetune NAME``, ``distill NAME``) come from ``tasks.TASKS``: a new fine-tuning task
gets its command from its entry there.

Arguments are parsed by tyro from the config dataclasses (their field docstrings are the ``--help``
text). Every command also takes ``--config RECIPE.yaml``: the recipe is validated strictly (unknown
keys and bad values fail naming the file and key) and becomes the defaults that command-line flags
then override, e.g. ``--vocab-size 8000`` or ``--model.d-model 256``. ``--resume RUN_DIR`` continues
a run: its ``config.yaml`` is the recipe and its checkpoints are resumed, in that same directory.

Nothing is imported before a command is chosen, and the configs are torch-free, so ``lmforge --help``
and ``lmforge COMMAND --help`` never import torch. Errors: a ``UserError`` (and a missing file) is one
line and exit 2; any other exception is a bug in lmforge and shows its traceback (exit 1). What a
command prints lives in ``commands/``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import tyro
from rich.markup import escape

from lmforge.commands._console import console
from lmforge.errors import UserError
from lmforge.tasks import TASKS, resolve


class Command(NamedTuple):
    summary: str
    config: str
    """``module:Class`` of its config."""
    run: str
    """``module:function`` that runs it."""


def _task_commands() -> dict[str, Command]:
    """One command per fine-tuning task of TASKS (``finetune NAME``, ``distill NAME``): its config and runner."""
    entries = [e for e in TASKS.values() if e.kind == "finetune"]
    entries.sort(key=lambda e: not e.command_name.startswith("finetune "))  # finetune first, then distill
    return {e.command_name: Command(e.summary, e.config, e.runner) for e in entries}


COMMANDS: dict[str, Command] = {
    "tokenizer train": Command(
        "Train a WordPiece or byte-level BPE tokenizer on text files",
        "lmforge.data.tokenizer:TokenizerTrainConfig",
        "lmforge.commands.tokenizer:run",
    ),
    "prepare": Command(
        "Tokenize corpora into token shards for pretraining",
        "lmforge.data.shards:PrepareConfig",
        "lmforge.commands.prepare:run",
    ),
    "pretrain": Command(
        "Pretrain a BERT (mlm, wwm-mlm, electra) or GPT (clm) on a corpus",
        "lmforge.runs.config:PretrainConfig",
        "lmforge.commands.pretrain:run",
    ),
    **_task_commands(),
    "evaluate": Command(
        "Evaluate a fine-tuned run directory on labelled data",
        "lmforge.commands.evaluate:Config",
        "lmforge.commands.evaluate:run",
    ),
    "predict": Command(
        "Predict with a fine-tuned run directory: JSONL out",
        "lmforge.commands.predict:Config",
        "lmforge.commands.predict:run",
    ),
    "explain": Command(
        "Explain a run's outputs (classify, NER, embed, translate, GPT): token attributions, JSONL + HTML + PNG",
        "lmforge.commands.explain:Config",
        "lmforge.commands.explain:run",
    ),
    "translate": Command(
        "Translate a file with a translation run directory",
        "lmforge.commands.translate:Config",
        "lmforge.commands.translate:run",
    ),
    "generate": Command(
        "Generate text from one prompt with a GPT model or chat run",
        "lmforge.commands.chat:GenerateConfig",
        "lmforge.commands.chat:run_generate",
    ),
    "chat": Command(
        "Chat in the terminal with a chat run directory",
        "lmforge.commands.chat:ChatConfig",
        "lmforge.commands.chat:run_chat",
    ),
    "embed": Command(
        "Embed texts with a SimCSE run (or any lmforge BERT)",
        "lmforge.commands.embed:Config",
        "lmforge.commands.embed:run",
    ),
    "demo": Command(
        "The whole pipeline on built-in Chinese data, with baselines",
        "lmforge.runs.config:DemoConfig",
        "lmforge.commands.demo:run",
    ),
    "compare": Command(
        "Pretraining objectives at equal FLOPs, fine-tuned on built-in tasks",
        "lmforge.runs.config:CompareConfig",
        "lmforge.commands.compare:run",
    ),
    "nas": Command(
        "Architecture search under a latency budget on this machine",
        "lmforge.nas.config:NASConfig",
        "lmforge.commands.nas:run",
    ),
    "serve": Command(
        "Serve run directories over HTTP (OpenAI-style API and a web page)",
        "lmforge.commands.serve:ServeConfig",
        "lmforge.commands.serve:run",
    ),
    "convert": Command(
        "Import a Hugging Face model directory, a GGUF file or a built-in checkpoint",
        "lmforge.commands.convert:Config",
        "lmforge.commands.convert:run",
    ),
    "models list": Command(
        "List the built-in pretrained checkpoints",
        "lmforge.commands.convert:ListConfig",
        "lmforge.commands.convert:run_list",
    ),
    "export": Command(
        "Export a model or run directory to the Hugging Face layout, or a BERT run to ONNX",
        "lmforge.commands.export:Config",
        "lmforge.commands.export:run",
    ),
    "quantize": Command(
        "Copy a classify / NER / embed run with int8 weights for CPU inference",
        "lmforge.commands.quantize:Config",
        "lmforge.commands.quantize:run",
    ),
    "data list": Command(
        "List the built-in corpora with their split sizes",
        "lmforge.commands.data:ListConfig",
        "lmforge.commands.data:run_list",
    ),
    "data export": Command(
        "Write a built-in corpus's splits as JSONL / CoNLL / TSV files",
        "lmforge.commands.data:ExportConfig",
        "lmforge.commands.data:run_export",
    ),
    "data fetch": Command(
        "Fetch a corpus shipped outside PyPI once (tang-poems: npm chinese-poetry)",
        "lmforge.commands.data:FetchConfig",
        "lmforge.commands.data:run_fetch",
    ),
}


def config_class(name: str) -> type:
    """The config dataclass of the command ``name`` (imports its module)."""
    return resolve(COMMANDS[name].config)


def _usage() -> None:
    usage = "usage: lmforge COMMAND [--config RECIPE.yaml] [OPTIONS]   (lmforge COMMAND --help for options)\n"
    console.print(usage, highlight=False, soft_wrap=True)
    width = max(len(name) for name in COMMANDS)
    for name, command in COMMANDS.items():
        console.print(f"  lmforge {name:<{width}}  {command.summary}", highlight=False, soft_wrap=True)


def _recipe_defaults(cls: type, path: str) -> Any:
    """The recipe at ``path`` as a ``cls`` instance; required fields it leaves out stay required."""
    from lmforge.config import from_dict
    from lmforge.files import read_yaml

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
    raise UserError(f"{path}: the recipe must set {name!r}")


def _flag_value(args: list[str], flag: str) -> str | None:
    if flag not in args:
        return None
    i = args.index(flag)
    if i + 1 >= len(args) or args[i + 1].startswith("-"):
        raise UserError(f"{flag} needs a value")
    return args[i + 1]


def _expand_resume(args: list[str]) -> list[str]:
    """``--resume RUN_DIR`` continues that run: its config.yaml is the recipe, ``--out`` is RUN_DIR itself and the
    config's ``resume`` flag is set."""
    run_dir = _flag_value(args, "--resume")
    if run_dir is None:
        return args
    if not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
    out = _flag_value(args, "--out")
    if out is not None and Path(out).resolve() != Path(run_dir).resolve():
        raise UserError(f"--resume {run_dir} continues that run in place; drop --out {out} (or resume {out})")
    extra = [] if out is not None else ["--out", run_dir]
    i = args.index("--resume")
    args = [*args[: i + 1], *args[i + 2 :]]  # the flag stays, its directory is --out
    return ["--config", str(Path(run_dir) / "config.yaml"), *args, *extra]


def _split_equals(args: list[str]) -> list[str]:
    """``--resume=DIR``, ``--out=DIR`` and ``--config=FILE`` as two arguments, as the CLI reads them itself."""
    out: list[str] = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        out += [flag, value] if eq and flag in ("--resume", "--out", "--config", "-c") else [arg]
    return out


def _parse(name: str, rest: list[str]) -> Any:
    cls = config_class(name)
    default = None
    rest = _expand_resume(_split_equals(rest))
    flag = next((f for f in ("--config", "-c") if f in rest), None)
    if flag:
        i = rest.index(flag)
        if i + 1 >= len(rest):
            raise UserError(f"{flag} needs a YAML file")
        recipe = rest[i + 1]
        default = _recipe_defaults(cls, recipe)
        rest = rest[:i] + rest[i + 2 :]
        _command_line_data_wins(default, rest)
        _recipe_steps_or_epochs(default, recipe, rest)
    rest = _steps_or_epochs(cls, rest)
    return tyro.cli(cls, args=rest, prog=f"lmforge {name}", default=default)


_MAX_STEPS_FLAGS = ("--training.max-steps", "--training.max_steps")


def _refuse_both_lengths(epochs: object, steps: object, epochs_where: str, steps_where: str) -> None:
    """A fine-tuning's length is its epochs or training.max_steps: both set (epochs not 0) is refused, never one
    silently ignored. A value that is not a number is left for the parser to name."""
    try:
        nonzero = float(str(epochs)) != 0
    except ValueError:
        return
    if nonzero:
        raise UserError(
            f"{epochs_where} {epochs} and {steps_where} {steps} both set the length of the run: give one "
            "(epochs 0 trains max_steps steps)"
        )


def _steps_or_epochs(cls: type, rest: list[str]) -> list[str]:
    """``--training.max-steps`` on the command line is honoured (epochs 0) and refused beside ``--epochs`` > 0
    (commands without epochs pass through)."""
    if "epochs" not in {f.name for f in dataclasses.fields(cls)} or not any(f in rest for f in _MAX_STEPS_FLAGS):
        return rest
    steps = next(_flag_value(rest, f) for f in _MAX_STEPS_FLAGS if f in rest)
    epochs = _flag_value(rest, "--epochs")
    if epochs is None:
        return [*rest, "--epochs", "0"]
    _refuse_both_lengths(epochs, steps, "--epochs", "--training.max-steps")
    return rest


def _recipe_steps_or_epochs(recipe_cfg: Any, path: str, rest: list[str]) -> None:
    """The same rule for a recipe that sets ``training.max_steps``: it runs that many steps unless it (or the
    command line) sets epochs too. A resumed run's config.yaml holds the length it was started with and is read
    as it is; steps given on the command line are ``_steps_or_epochs``'."""
    from lmforge.files import read_yaml

    if "--resume" in rest or "epochs" not in {f.name for f in dataclasses.fields(recipe_cfg)}:
        return
    data = read_yaml(path)
    steps = (data.get("training") or {}).get("max_steps") if isinstance(data.get("training"), dict) else None
    if steps is None or any(f in rest for f in _MAX_STEPS_FLAGS):
        return
    epochs = _flag_value(rest, "--epochs") if "--epochs" in rest else data.get("epochs")
    if epochs is None:
        object.__setattr__(recipe_cfg, "epochs", 0.0)
        return
    where = "--epochs" if "--epochs" in rest else f"{path}: epochs"
    _refuse_both_lengths(epochs, steps, where, f"{path}: training.max_steps")


_FILE_FLAGS = ("--train", "--dev", "--test")


def _command_line_data_wins(recipe: Any, rest: list[str]) -> None:
    """Data named on the command line replaces the recipe's: ``--train/--dev/--test`` files drop its built-in
    ``data`` corpus, ``--data`` drops its files (as any flag overrides the recipe's value); both on the command
    line are still refused, by the fine-tuning that reads them."""
    fields = {f.name for f in dataclasses.fields(recipe)}
    if not {"data", "train", "dev", "test"} <= fields:
        return
    if any(flag in rest for flag in _FILE_FLAGS) and getattr(recipe, "data", None):
        object.__setattr__(recipe, "data", None)
    if "--data" in rest:
        for split in ("train", "dev", "test"):
            if getattr(recipe, split, None):
                object.__setattr__(recipe, split, None)


def command_name(argv: list[str]) -> str | None:
    """The command that ``argv`` (the arguments after ``lmforge``) starts with, e.g. "finetune classify"."""
    return next((n for n in sorted(COMMANDS, key=len, reverse=True) if argv[: len(n.split())] == n.split()), None)


def parse(argv: list[str]) -> tuple[str, Any]:
    """(command, config) for ``argv`` as ``main`` reads it, without running anything: the docs' tests parse every
    command line of the documentation with it. A bad flag exits as tyro does (SystemExit 2, message on stderr)."""
    name = command_name(argv)
    if name is None:
        raise UserError(f"unknown command {' '.join(argv[:2])!r}; commands: {', '.join(COMMANDS)}")
    return name, _parse(name, argv[len(name.split()) :])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = command_name(argv)
    if name is None:
        _usage()
        known = argv and argv[0] not in ("-h", "--help")
        if known:
            console.print(f"[red]error:[/red] unknown command {' '.join(argv[:2])!r}")
        return 2 if known or not argv else 0
    try:
        cfg = _parse(name, argv[len(name.split()) :])
        resolve(COMMANDS[name].run)(cfg)
    except (UserError, FileNotFoundError, IsADirectoryError) as e:
        # the message is text, not markup: "lmforge[models]" or a file named "[x].csv" are printed as they are
        console.print(f"[red]error:[/red] {escape(_user_message(e))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as e:  # permissions, a full disk, a vanished mount: the path and the system's reason
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[red]error:[/red] {escape(where + str(e.strerror or e))}")
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (the loop saved a checkpoint first)
        code = getattr(e, "exit_code", 130)
        console.print(f"[yellow]stopped[/yellow] by {e}" if code != 130 or str(e) else "[yellow]interrupted[/yellow]")
        return code
    except Exception:  # anything else is a bug in lmforge: show where
        traceback.print_exc()
        console.print("[red]internal error[/red]: the traceback above is a bug in lmforge; please report it")
        return 1
    return 0


def _user_message(e: Exception) -> str:
    if isinstance(e, IsADirectoryError):
        return f"{e.filename}: is a directory; give a file"
    if isinstance(e, FileNotFoundError):
        return f"{e.filename}: not found" if e.filename else str(e)
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
