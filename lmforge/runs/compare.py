"""``lmforge compare``: pretraining objectives at equal compute, judged by what they give fine-tuning.

The experiment of ELECTRA's paper (Clark et al., 2020, Table 1 and Appendix F) on our data: masked
LM, ELECTRA (a maximum-likelihood generator) and adversarial ELECTRA (a generator trained with
REINFORCE to fool the discriminator) each pretrain the same BERT on ``pretrain-zh`` for the same
*counted training FLOPs* (``Task.flops``, the count every run reports), then each resulting encoder is
fine-tuned identically (the demo's recipe) on ``reviews-sentiment`` and ``peoples-daily-ner``; every
objective runs with several seeds, and the test scores are reported as mean, sample standard deviation
and the per-seed values.

The budget is given as a number of masked-LM steps (``budget_mlm_steps``) at the shared batch shape;
every other objective gets as many steps as fit in the same FLOPs, computed from the mean counted
FLOPs of real collated batches of each objective. Each objective keeps the learning rate found for it
(``OBJECTIVES``); schedules are cosine over each run's own step count. Fine-tuning has no wall-time cap,
so the scores do not depend on the machine's load; pretraining wall time is reported beside the FLOPs.

The comparison is resumable: every finished stage (a pretraining or a fine-tuning run directory with
its results.json) is kept, and running the same command again continues where it stopped. Output:
``OUT/results.json``, ``OUT/report.md``, ``OUT/compare.png`` and each stage's run directory.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from lmforge.data.builtin import first_examples, load_builtin
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.files import atomic_write, read_yaml, write_json, write_text, write_yaml
from lmforge.runs.config import (
    BUILTIN_FINETUNES,
    OBJECTIVES,
    SCRATCH,
    CompareConfig,
    ModelSpec,
    PretrainConfig,
    PretrainData,
)
from lmforge.runs.demo import finetune_config, pretrain_inputs
from lmforge.runs.finetune import finetune
from lmforge.runs.pretrain import build_objective, prepare_corpus, pretrain
from lmforge.runs.session import holds_out_dir
from lmforge.train import checkpoint, distributed
from lmforge.train.config import TrainConfig
from lmforge.train.logging import read_metrics
from lmforge.train.optim import OptimConfig


def pretrain_config(cfg: CompareConfig, name: str, seed: int, steps: int, corpus: Path) -> PretrainConfig:
    """The pretraining run of objective ``name`` with ``seed`` for ``steps`` steps (shared tokenizer and shards)."""
    objective = OBJECTIVES[name]
    optim = OptimConfig(
        lr=objective.lr, warmup_steps=100, warmup_share=0.2, schedule="cosine", min_lr_ratio=0.1
    )  # at most a fifth of a short comparison warms up
    train = TrainConfig(
        max_steps=steps,
        global_batch_size=cfg.batch_size,
        micro_batch_size=min(32, cfg.batch_size),
        seed=seed,
        optim=optim,
        eval_every=0,
        eval_batches=20,
        save_every=0,
        keep_last=1,
        log_every=10,
        progress=cfg.progress,
    )
    data = PretrainData(
        input=pretrain_inputs(Path(cfg.out), cfg.limit),
        tokenizer=str(corpus / "tokenizer"),
        shards=str(corpus / "data"),
        seq_len=cfg.seq_len,
        vocab_size=21128,
    )
    return PretrainConfig(
        out=str(Path(cfg.out) / "pretrain" / f"{name}-seed{seed}"),
        task=objective.task,  # type: ignore[arg-type]
        model=ModelSpec(size=cfg.size, dropout=0.0),
        data=data,
        training=train,
        electra=objective.electra,
    )


def flops_per_step(pcfg: PretrainConfig, n_batches: int = 8) -> float:
    """Mean counted training FLOPs of one optimizer step of ``pcfg``'s objective over real collated batches
    (the masking draws vary the number of predicted tokens, and with it the count)."""
    tok = load_tokenizer(pcfg.data.tokenizer)
    model, task = build_objective(pcfg, tok, Path(pcfg.data.shards))
    generator = torch.Generator().manual_seed(0)
    B, n = pcfg.training.global_batch_size, len(task.train_items)
    total = 0.0
    for k in range(n_batches):
        items = [task.train_items[(k * B + i) % n] for i in range(B)]
        total += task.flops(model, task.collate(items, generator=generator))
    return total / n_batches


def plan(cfg: CompareConfig) -> dict[str, dict]:
    """Steps per objective for the budget: {name: {"steps", "flops_per_step", "lr"}} plus the budget."""
    corpus = Path(cfg.out) / "corpus"
    per_step = {name: flops_per_step(pretrain_config(cfg, name, cfg.seeds[0], 1, corpus)) for name in OBJECTIVES}
    budget = cfg.budget_mlm_steps * per_step["mlm"]
    steps = {
        name: {
            "steps": max(1, round(budget / per_step[name])),
            "flops_per_step": per_step[name],
            "lr": OBJECTIVES[name].lr,
        }
        for name in cfg.objectives
    }
    return {"budget_flops": budget, "objectives": steps}


@holds_out_dir
def run_compare(cfg: CompareConfig) -> dict:
    """Every pretraining and fine-tuning (skipping finished ones); returns (and writes) results.json's content."""
    out = Path(cfg.out)
    _check_same_settings(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", cfg)
    corpus = out / "corpus"
    first = pretrain_config(cfg, cfg.objectives[0], cfg.seeds[0], 1, corpus)
    corpus_cfg = dataclasses.replace(first, data=dataclasses.replace(first.data, tokenizer=None, shards=None))
    prepare_corpus(corpus_cfg, corpus, distributed.Dist())
    budget = plan(cfg)
    runs = []
    for seed in cfg.seeds:  # seed-major: machine-load drifts spread over the objectives alike
        for name in cfg.objectives:
            steps = budget["objectives"][name]["steps"]
            pcfg = pretrain_config(cfg, name, seed, steps, corpus)
            pre = checkpoint.finished_or_run(Path(pcfg.out), lambda pcfg=pcfg: pretrain(pcfg), finished="model_weights")
            runs.append(
                {
                    "objective": name,
                    "seed": seed,
                    "pretraining": _pretraining_summary(pre, Path(pcfg.out)),
                    **_finetune_all(cfg, name, seed, "pretrained"),
                }
            )
        if cfg.scratch_seeds is None or seed in cfg.scratch_seeds:
            runs.append({"objective": SCRATCH, "seed": seed, **_finetune_all(cfg, cfg.objectives[0], seed, SCRATCH)})
    summary = {
        "budget": {
            **budget,
            "mlm_steps": cfg.budget_mlm_steps,
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "size": cfg.size,
        },
        "runs": runs,
        "summary": aggregate(runs),
        "settings": dataclasses.asdict(cfg),
    }
    summary["claim"] = claim(summary["summary"])
    write_json(out / "results.json", summary)
    plot(summary, out / "compare.png")
    write_text(out / "report.md", report(summary))
    return summary


def _check_same_settings(cfg: CompareConfig, out: Path) -> None:
    """Finished stages are reused only for the same experiment: other settings need another directory."""
    if not (out / "config.yaml").is_file():
        return
    before = read_yaml(out / "config.yaml")
    now = dataclasses.asdict(cfg)
    keep_free = ("objectives", "seeds", "scratch_seeds", "progress", "out")  # adding runs does not change old ones
    changed = sorted(k for k in now if k not in keep_free and before.get(k) != now[k])
    if changed:
        raise UserError(
            f"{out / 'config.yaml'}: this directory holds a comparison with other {', '.join(changed)} "
            f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); use another --out or delete it"
        )


def _pretraining_summary(s: dict, run_dir: Path) -> dict:
    """What the comparison reports of a pretraining run, plus its wall time at the *median* logged speed:
    on a shared machine a burst of other work slows some logging windows, and the median ignores them."""
    keep = ("steps", "tokens", "train_flops", "seconds", "tokens_per_s", "mfu", "best_val_loss")
    found = {k: s.get(k) for k in keep}
    rates = [r["tokens_per_s"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    found["median_tokens_per_s"] = statistics.median(rates) if rates else s["tokens_per_s"]
    found["seconds_at_median_speed"] = s["tokens"] / found["median_tokens_per_s"]
    return found


def _finetune_all(cfg: CompareConfig, name: str, seed: int, init: str) -> dict:
    """Fine-tune the encoder of (``name``, ``seed``) on every task (or from scratch): {task: test metrics}."""
    out = Path(cfg.out)
    return finetune_on_tasks(
        out / "finetune" / (SCRATCH if init == SCRATCH else name) / f"seed{seed}",
        model=str(out / "pretrain" / f"{name}-seed{seed}"),  # scratch runs read only its config and tokenizer
        init=init,
        seed=seed,
        epochs={data: getattr(cfg, plan.epochs) for data, plan in BUILTIN_FINETUNES.items()},
        max_len=cfg.seq_len,
        progress=cfg.progress,
        limit=cfg.limit,
    )


def finetune_on_tasks(
    root: Path, *, model: str, init: str, seed: int, epochs: dict[str, float], max_len: int, progress: bool, limit: int
) -> dict:
    """The demo's fine-tuning of ``model`` (or, with ``init="scratch"``, of its architecture from random
    initialisation) on every corpus of ``BUILTIN_FINETUNES``, each in ``root / CORPUS``; a finished run found there
    is reused. ``epochs``: per corpus. Returns {corpus: {"test", "dev": scalar metrics, "steps", "seconds"}}."""
    found = {}
    for data, plan in BUILTIN_FINETUNES.items():
        splits = first_examples(load_builtin(data), limit) if limit else None
        run_dir = root / data
        ft = finetune_config(
            out=run_dir,
            model=model,
            data=data,
            init=init,
            epochs=epochs[data],
            max_len=max_len,
            seed=seed,
            progress=progress,
            splits=splits,
        )
        task = plan.task
        r = checkpoint.finished_or_run(run_dir, lambda ft=ft, task=task: finetune(ft, task).to_json(), finished="test")
        found[data] = {
            "test": scalars(r["test"]),
            "dev": scalars(r["dev"]),
            "steps": r["training"]["steps"],
            "seconds": r["training"]["seconds"],
        }
    return found


def _metrics() -> list[tuple[str, str]]:
    return [(data, plan.metric) for data, plan in BUILTIN_FINETUNES.items()]


def scalars(metrics: dict) -> dict:
    """The numbers of a metrics dict (per-type tables and lists left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def aggregate(runs: list[dict]) -> dict:
    """{objective: {task: {mean, std, values} of its test metric, "pretraining_minutes", "pretraining_pflops"}}."""
    found: dict[str, dict] = {}
    for name in dict.fromkeys(r["objective"] for r in runs):
        mine = [r for r in runs if r["objective"] == name]
        found[name] = {data: spread([r[data]["test"][metric] for r in mine]) for data, metric in _metrics()}
        if "pretraining" in mine[0]:
            found[name]["pretraining_minutes"] = spread([r["pretraining"]["seconds"] / 60 for r in mine])
            found[name]["pretraining_minutes_at_median_speed"] = spread(
                [r["pretraining"]["seconds_at_median_speed"] / 60 for r in mine]
            )
            found[name]["pretraining_pflops"] = spread([r["pretraining"]["train_flops"] / 1e15 for r in mine])
            found[name]["pretraining_steps"] = mine[0]["pretraining"]["steps"]
    return found


def claim(summary: dict) -> dict:
    """ELECTRA >= MLM at equal compute on both tasks (by the mean over seeds), with the gap in units of the
    larger of the two standard deviations (|gap| < 1 is within the seed-to-seed spread)."""
    if not {"mlm", "electra"} <= summary.keys():  # the claim under test names its two objectives
        return {}
    found = {}
    for data in BUILTIN_FINETUNES:
        e, m = summary["electra"][data], summary["mlm"][data]
        gap = e["mean"] - m["mean"]
        spread = max(e["std"], m["std"])
        found[data] = {"electra_minus_mlm": gap, "in_spreads": gap / spread if spread > 0 else None}
    return {"tasks": found, "electra_at_least_mlm": all(v["electra_minus_mlm"] >= 0 for v in found.values())}


def _fmt(s: dict, digits: int = 4) -> str:
    if len(s["values"]) == 1:  # no spread to show
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def report(summary: dict) -> str:
    """report.md: the equal-compute table, the per-seed scores, the claim and the plot."""
    b, by = summary["budget"], summary["summary"]
    lines = [
        "# Pretraining objectives at equal compute",
        "",
        f"Every encoder is a {b['size']} pretrained on pretrain-zh for {b['budget_flops'] / 1e15:.3g} PFLOPs",
        f"of counted training compute (the FLOPs of {b['mlm_steps']:,} masked-LM steps of {b['batch_size']} x "
        f"{b['seq_len']} tokens), then",
        "fine-tuned with the same recipe on each task. Test scores: mean ± sample standard deviation over seeds.",
        "",
        "| objective | lr | steps | PFLOPs | pretraining min (at median speed) | reviews-sentiment accuracy "
        "| peoples-daily-ner F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in by.items():
        plan_row = b["objectives"].get(name)
        lr = f"{plan_row['lr']:g}" if plan_row else "-"
        steps = f"{s['pretraining_steps']:,}" if "pretraining_steps" in s else "-"
        pf = _fmt(s["pretraining_pflops"], 4) if "pretraining_pflops" in s else "-"
        minutes = "-"
        if "pretraining_minutes" in s:
            minutes = f"{_fmt(s['pretraining_minutes'], 1)} ({_fmt(s['pretraining_minutes_at_median_speed'], 1)})"
        label = "none (random init)" if name == SCRATCH else name
        lines.append(
            f"| {label} | {lr} | {steps} | {pf} | {minutes} | {_fmt(s['reviews-sentiment'])} "
            f"| {_fmt(s['peoples-daily-ner'])} |"
        )
    lines += ["", "Per seed (test):", "", "| objective | seed | sentiment accuracy | NER F1 |", "|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(
            f"| {r['objective']} | {r['seed']} | {r['reviews-sentiment']['test']['accuracy']:.4f} | "
            f"{r['peoples-daily-ner']['test']['f1']:.4f} |"
        )
    c = summary.get("claim")
    if c:
        verdict = "holds" if c["electra_at_least_mlm"] else "does not hold"
        lines += ["", f"**ELECTRA >= MLM on both tasks at equal compute: {verdict}.**", ""]
        for data, v in c["tasks"].items():
            k = v["in_spreads"]
            spreads = "" if k is None else f" ({k:+.1f} x the larger seed standard deviation)"
            lines.append(f"- {data}: ELECTRA - MLM = {v['electra_minus_mlm']:+.4f}{spreads}")
    lines += [
        "",
        "![comparison](compare.png)",
        "",
        "Stage run directories: pretrain/OBJECTIVE-seedN/, finetune/OBJECTIVE/seedN/TASK/.",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Bars (mean) with each seed as a dot: sentiment accuracy, NER F1 and pretraining wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = summary["summary"]
    names = list(by)
    panels = [
        ("reviews-sentiment", "test accuracy"),
        ("peoples-daily-ner", "test entity F1"),
        ("pretraining_minutes_at_median_speed", "pretraining minutes (at median speed)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        shown = [n for n in names if key in by[n]]
        for i, n in enumerate(shown):
            s = by[n][key]
            ax.bar(i, s["mean"], yerr=s["std"], color=f"C{names.index(n)}", alpha=0.6, capsize=4)
            ax.scatter([i] * len(s["values"]), s["values"], color="black", s=12, zorder=3)
        ax.set_xticks(range(len(shown)), shown, rotation=15)
        ax.set_title(title)
        if key != "pretraining_minutes_at_median_speed":
            low = min(min(by[n][key]["values"]) for n in shown)
            high = max(max(by[n][key]["values"]) for n in shown)
            ax.set_ylim(max(0.0, low - 0.05 * (1 + high - low)), min(1.0, high + 0.02))
    b = summary["budget"]
    flops = f"{b['budget_flops'] / 1e15:.3g} PFLOPs"
    fig.suptitle(f"{b['size']}, {flops} of pretraining each; bars = mean ± std, dots = seeds")
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
