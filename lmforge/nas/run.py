"""``lmforge nas``: latency-aware architecture search for a fine-tuning task, on this machine.

Stages, each kept in the output directory so that running the command again continues it:

1. ``latency.json``: the forward latency of ``latency.measure`` random architectures of the space and
   of the baseline sizes, measured here; a ``LatencyModel`` fitted on them, with its error on the
   held-out ones.
2. ``supernet/``: the largest network of the space trained with the sandwich rule on the task
   (from scratch, or from a pretrained lmforge BERT of that shape), then ``supernet.candidates``
   architectures scored on the dev set with inherited weights, chosen by NSGA-II.
3. ``multi-trial/``: an Optuna study (SQLite) whose trials each train a candidate briefly.
4. ``pareto/ARCH/``: every architecture of the supernet's Pareto front (dev metric vs latency) as a
   model directory with its inherited weights, plus ``pretrain.yaml`` and ``finetune.yaml`` recipes.
5. ``retrain/``: the picks (the best at <= 1/2 and at <= 1x the first baseline's latency, the
   multi-trial's best) and the baseline retrained from scratch with the same recipe, scored on test.

Output: ``results.json``, ``report.md`` (the Pareto table, the cost of both strategies, the latency
model's error, the retrained scores) and ``pareto.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
from pathlib import Path

import optuna
import torch

from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.errors import UserError
from lmforge.files import atomic_write, write_json, write_text, write_yaml
from lmforge.models.bert import Bert
from lmforge.models.registry import load_encoder_weights, read_config, save_model
from lmforge.models.sizes import SIZES
from lmforge.nas.config import NASConfig
from lmforge.nas.latency import LatencyModel, held_out_split, measure_latency, relative_errors
from lmforge.nas.search import finished_trials, multi_trial, open_study, pareto_front, score_with_supernet
from lmforge.nas.space import Arch, base_config
from lmforge.nas.supernet import SandwichTask, Supernet
from lmforge.runs.finetune import finetune, load_splits, training_for_epochs
from lmforge.runs.session import holds_out_dir
from lmforge.tasks import TASKS, task_entry
from lmforge.tasks.base import Searchable
from lmforge.train import checkpoint
from lmforge.train.loop import fit

log = logging.getLogger(__name__)


@holds_out_dir
def run_nas(cfg: NASConfig) -> dict:
    """Every stage (finished ones are reused); returns (and writes) results.json's content."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are logged by the loop and the report
    splits, _ = load_splits(cfg, TASKS[cfg.task])
    tok_dir = _tokenizer(cfg, splits, out)
    tok = load_tokenizer(tok_dir)
    space = cfg.space
    base = dataclasses.replace(
        base_config(space, tok.vocab_size, max_seq_len=max(cfg.max_len, space.latency_seq_len)),
        dropout=cfg.dropout,
        attn_dropout=cfg.dropout,
    )
    task = _task(cfg, tok, splits)
    metric = task.selection[0]
    dev_lengths = [len(item[0]) for item in task.val_items]

    def build(arch: Arch):
        return task.build_model(Bert(arch.config(base)))

    latency, latency_report = _latency(cfg, base, out)
    baselines = {name: Arch.of(SIZES[name]) for name in space.baselines}
    found: dict = {"latency_model": latency_report, "metric": metric, "baselines": {}}
    for name, arch in baselines.items():
        found["baselines"][name] = {"arch": arch.name, "measured_ms": latency_report["baselines"][name]}
    supernet = None
    if "supernet" in cfg.strategies:
        supernet, found["supernet"] = _supernet(cfg, task, build, latency, base, out, dev_lengths)
        for name, arch in baselines.items():
            if space.contains(arch):
                found["baselines"][name]["inherited_dev"] = _score(supernet, task, arch)
    if "multi-trial" in cfg.strategies:
        found["multi_trial"] = _multi_trial(cfg, task, build, latency, base, out, dev_lengths)
    found["cost"] = _cost(found)
    if supernet is not None:
        _write_pareto_dirs(cfg, supernet, found["supernet"]["pareto"], tok_dir, out)
    if cfg.retrain_epochs > 0:
        found["retrained"] = _retrain(cfg, found, supernet, build, base, tok_dir, out)
    write_json(out / "results.json", found)
    plot(found, out / "pareto.png")
    write_text(out / "report.md", report(found, cfg))
    return found


def _task(cfg: NASConfig, tok, splits: dict) -> Searchable:
    """The fine-tuning task every candidate is scored on, as the task's ``for_search`` builds it."""
    task_cls = task_entry(cfg.task, kind="finetune").load()
    assert issubclass(task_cls, Searchable), f"{cfg.task} is searchable"
    return task_cls.for_search(tok, splits, max_len=cfg.max_len, dropout=cfg.dropout)


def _tokenizer(cfg: NASConfig, splits: dict, out: Path) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    if cfg.init != "scratch":
        return Path(cfg.init)
    target = out / "tokenizer"
    if not (target / "tokenizer.json").is_file():

        def texts():
            for ex in splits["train"]:
                yield ex["text"] if "text" in ex else "".join(ex["tokens"])

        tok = train_tokenizer(texts, kind="wordpiece", vocab_size=cfg.vocab_size)
        save_tokenizer(tok, target, model_max_length=cfg.max_len)
    return target


def _latency(cfg: NASConfig, base, out: Path) -> tuple[LatencyModel, dict]:
    """Measured latencies (kept in latency.json: a rerun measures only what is missing) and the model."""
    space, s = cfg.space, cfg.latency
    path = out / "latency.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    shape = {"batch": space.latency_batch, "seq_len": space.latency_seq_len, "threads": torch.get_num_threads()}
    measured: dict[str, float] = saved.get("measured", {}) if saved.get("shape") == shape else {}
    archs = space.archs()
    rng = random.Random(cfg.training.seed)
    sample = rng.sample(archs, min(s.measure, len(archs)))
    baselines = {name: Arch.of(SIZES[name]) for name in space.baselines}
    by_name = {a.name: a for a in [*sample, *baselines.values()]}
    for name, arch in by_name.items():
        if name not in measured:
            measured[name] = measure_latency(
                arch, base, batch=shape["batch"], seq_len=shape["seq_len"], warmup=s.warmup, repeats=s.repeats
            )
            write_json(path, {"shape": shape, "measured": measured})
    names = sorted(by_name)
    fit_idx, held_idx = held_out_split(len(names), s.held_out, cfg.training.seed)
    fit_archs = [by_name[names[i]] for i in fit_idx]
    held = [by_name[names[i]] for i in held_idx]
    model = LatencyModel.fit(
        fit_archs, [measured[a.name] for a in fit_archs], batch=shape["batch"], seq_len=shape["seq_len"]
    )
    errors = relative_errors(model, held, [measured[a.name] for a in held])
    final = LatencyModel.fit(
        list(by_name.values()), [measured[n] for n in by_name], batch=shape["batch"], seq_len=shape["seq_len"]
    )
    report = {
        **shape,
        "measured": measured,
        "held_out": [a.name for a in held],
        "held_out_median_relative_error": statistics.median(errors),
        "held_out_max_relative_error": max(errors),
        "model": final.to_dict(),
        "baselines": {n: measured[a.name] for n, a in baselines.items()},
    }
    write_json(path, {"shape": shape, **report})
    return final, report


def _score(supernet: Supernet, task, arch: Arch) -> float:
    supernet.eval()
    return float(task.evaluate(supernet.bind(arch), device=torch.device("cpu"))[task.selection[0]])


def _supernet(cfg: NASConfig, task, build, latency, base, out: Path, dev_lengths: list[int]) -> tuple[Supernet, dict]:
    """Train the supernet (or reuse a finished training), then score candidates with inherited weights."""
    space, s = cfg.space, cfg.supernet
    torch.manual_seed(cfg.training.seed)
    supernet = Supernet(build, space)
    if cfg.init != "scratch":
        shape = Arch.of(read_config(cfg.init))
        if shape != space.largest:
            raise UserError(
                f"init={cfg.init}: its shape {shape.name} must be the space's largest, {space.largest.name}"
            )
        load_encoder_weights(supernet.full.encoder, cfg.init)
    sandwich = SandwichTask(task, space, n_random=s.n_random)
    training = training_for_epochs(cfg.training, s.epochs, len(task.train_items))
    run_dir = out / "supernet"

    def train() -> dict:
        summary = fit(supernet, sandwich, training, run_dir=run_dir)
        return {**summary, "trained": True}

    summary = checkpoint.finished_or_run(run_dir, train, finished="best_dev")
    checkpoint.load_best(supernet, run_dir, summary.get("best_step"))
    candidates_path = run_dir / "candidates.json"
    if candidates_path.is_file():  # dev scores do not depend on latency: predictions come from today's model
        saved = json.loads(candidates_path.read_text(encoding="utf-8"))
        rows, scoring_flops = saved["rows"], saved["scoring_flops"]
        for r in rows:
            r["predicted_ms"] = latency.predict(Arch(r["n_layers"], r["d_model"], r["n_heads"], r["d_ff"]))
    else:
        rows, scoring_flops = score_with_supernet(
            lambda arch: _score(supernet, task, arch),
            space=space,
            latency=latency,
            base=base,
            n_candidates=s.candidates,
            population=s.population,
            seed=cfg.training.seed,
            dev_lengths=dev_lengths,
        )
        write_json(candidates_path, {"rows": rows, "scoring_flops": scoring_flops})
    front = pareto_front(rows)
    shape = (cfg.space.latency_batch, cfg.space.latency_seq_len)
    for r in front:
        r["measured_ms"] = _measured(cfg, base, Arch(r["n_layers"], r["d_model"], r["n_heads"], r["d_ff"]), shape, out)
    return supernet, {
        "train_flops": summary["train_flops"],
        "train_seconds": summary["seconds"],
        "steps": summary["steps"],
        "scoring_flops": scoring_flops,
        "candidates": rows,
        "pareto": front,
    }


def _measured(cfg: NASConfig, base, arch: Arch, shape: tuple[int, int], out: Path) -> float:
    """Measured latency of ``arch`` (from latency.json when already measured there)."""
    saved = json.loads((out / "latency.json").read_text(encoding="utf-8"))
    if arch.name not in saved["measured"]:
        saved["measured"][arch.name] = measure_latency(
            arch, base, batch=shape[0], seq_len=shape[1], warmup=cfg.latency.warmup, repeats=cfg.latency.repeats
        )
        write_json(out / "latency.json", saved)
    return saved["measured"][arch.name]


def _multi_trial(cfg: NASConfig, task, build, latency, base, out: Path, dev_lengths: list[int]) -> dict:
    run_dir = out / "multi-trial"
    training = training_for_epochs(cfg.training, cfg.trials.epochs, len(task.train_items))
    training = dataclasses.replace(training, eval_every=max(1, training.max_steps // cfg.trials.evals), progress=False)
    study = open_study(run_dir / "study.db", seed=cfg.training.seed, space=cfg.space, latency=latency, base=base)
    rows = multi_trial(
        study,
        n_trials=cfg.trials.n_trials,
        build=build,
        task=task,
        training=training,
        space=cfg.space,
        latency=latency,
        base=base,
        run_dir=run_dir,
        dev_lengths=dev_lengths,
    )
    return {"trials": rows, "n_finished": len(finished_trials(study)), "epochs_per_trial": cfg.trials.epochs}


def _cost(found: dict) -> dict:
    """Supernet (training + scoring every candidate) vs multi-trial (mean FLOPs per trial x candidates)."""
    cost: dict = {}
    if "supernet" in found:
        s = found["supernet"]
        cost["supernet_flops"] = s["train_flops"] + s["scoring_flops"]
        cost["supernet_candidates"] = len(s["candidates"])
    if "multi_trial" in found and found["multi_trial"]["trials"]:
        spent = [t["trial_flops"] for t in found["multi_trial"]["trials"]]
        cost["multi_trial_flops_per_candidate"] = statistics.fmean(spent)
        cost["multi_trial_trials_run"] = len(spent)
    if "supernet_flops" in cost and "multi_trial_flops_per_candidate" in cost:
        n = cost["supernet_candidates"]
        cost["multi_trial_flops_for_same_candidates"] = n * cost["multi_trial_flops_per_candidate"]
        cost["supernet_share"] = cost["supernet_flops"] / cost["multi_trial_flops_for_same_candidates"]
    return cost


def _write_pareto_dirs(cfg: NASConfig, supernet: Supernet, front: list[dict], tok_dir: Path, out: Path) -> None:
    """Each Pareto architecture as a model directory (inherited weights) with pretrain / finetune recipes."""
    for r in front:
        arch = Arch(r["n_layers"], r["d_model"], r["n_heads"], r["d_ff"])
        directory = out / "pareto" / arch.name
        save_model(supernet.extract(arch).encoder, directory)
        copy_tokenizer_files(tok_dir, directory)
        shape = dataclasses.asdict(arch)
        write_yaml(
            directory / "pretrain.yaml",
            {
                "task": "mlm",
                "model": {"size": "bert-tiny", **shape, "dropout": 0.0},
                "data": {"input": ["builtin:pretrain-zh"], "tokenizer": str(directory), "seq_len": cfg.max_len},
            },
        )
        data = (
            {"data": cfg.data}
            if cfg.data
            else {k: getattr(cfg, k) for k in ("train", "dev", "test") if getattr(cfg, k)}
        )
        write_yaml(
            directory / "finetune.yaml",
            {"model": str(directory), "init": "pretrained", **data, "max_len": cfg.max_len, "dropout": cfg.dropout},
        )
        r["directory"] = str(directory)


def _picks(found: dict) -> dict[str, Arch]:
    """What to confirm by retraining: the best inherited dev metric at <= 1/2 and <= 1x the first
    baseline's measured latency, and the multi-trial's best; the baseline itself."""
    picks: dict[str, Arch] = {}
    baseline_name, baseline = next(iter(found["baselines"].items()))
    reference = baseline["measured_ms"]
    rows = found.get("supernet", {}).get("pareto", [])
    for label, budget in (("half-latency", 0.5 * reference), ("equal-latency", reference)):
        fitting = [r for r in rows if r["measured_ms"] <= budget]
        if fitting:
            best = max(fitting, key=lambda r: r["dev"])
            picks[label] = Arch(best["n_layers"], best["d_model"], best["n_heads"], best["d_ff"])
    trials = found.get("multi_trial", {}).get("trials", [])
    complete = [t for t in trials if t["state"] == "complete"]
    if complete:
        best = max(complete, key=lambda r: r["dev"])
        picks["multi-trial-best"] = Arch(best["n_layers"], best["d_model"], best["n_heads"], best["d_ff"])
    picks[baseline_name] = Arch.of(SIZES[baseline_name])
    return picks


def _retrain(cfg: NASConfig, found: dict, supernet, build, base, tok_dir: Path, out: Path) -> dict:
    """The picks and the baseline retrained from random initialisation with one recipe, scored on dev and test."""
    shape = (cfg.space.latency_batch, cfg.space.latency_seq_len)
    results: dict[str, dict] = {}
    for label, arch in _picks(found).items():
        same = next((r for r in results.values() if r["arch"] == arch.name), None)
        if same is not None:  # one architecture picked twice: trained once
            results[label] = same
            continue
        model_dir = out / "retrain" / "models" / arch.name
        if not (model_dir / "config.json").is_file():
            torch.manual_seed(cfg.training.seed)
            save_model(Bert(arch.config(base)), model_dir)
            copy_tokenizer_files(tok_dir, model_dir)
        kind = cfg.task
        files = {k: getattr(cfg, k) for k in ("data", "train", "dev", "test")}
        config_cls = TASKS[kind].load_config()
        ft = config_cls(
            out=str(out / "retrain" / f"{label}-{arch.name}"),
            model=str(model_dir),
            init="scratch",
            epochs=cfg.retrain_epochs,
            dropout=cfg.dropout,
            max_len=cfg.max_len,
            training=cfg.training,
            skip_bad_rows=cfg.skip_bad_rows,
            **files,
        )
        finished = "test" if cfg.test or cfg.data else "wall_seconds"  # the last keys finetune writes
        r = checkpoint.finished_or_run(ft.out, lambda ft=ft, kind=kind: finetune(ft, kind).to_json(), finished=finished)
        results[label] = {
            "arch": arch.name,
            **dataclasses.asdict(arch),
            "measured_ms": _measured(cfg, base, arch, shape, out),
            "dev": _scalars(r["dev"]),
            "test": _scalars(r.get("test", {})),
            "run": ft.out,
        }
    return results


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def report(found: dict, cfg: NASConfig) -> str:
    """report.md: latency model, Pareto table, cost comparison, retrained picks against the baseline."""
    metric = found["metric"]
    lat = found["latency_model"]
    lines = [
        f"# Architecture search: {cfg.task} on {cfg.data or cfg.train}",
        "",
        f"Latency: forward pass at batch {lat['batch']} x {lat['seq_len']} tokens, {lat['threads']} threads, median"
        f" of {cfg.latency.repeats} runs. Latency model fitted on {len(lat['measured']) - len(lat['held_out'])}"
        f" measured architectures; on {len(lat['held_out'])} held out: median relative error"
        f" {100 * lat['held_out_median_relative_error']:.1f}%, max {100 * lat['held_out_max_relative_error']:.1f}%.",
        "",
    ]
    if "supernet" in found:
        s = found["supernet"]
        lines += [
            f"## Pareto front (supernet, {len(s['candidates'])} candidates scored with inherited weights)",
            "",
            f"| architecture | dev {metric} | measured ms | predicted ms | params | GFLOPs | directory |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s["pareto"]:
            lines.append(
                f"| {r['arch']} | {r['dev']:.4f} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | "
                f"{r['params']:,} | {r['flops'] / 1e9:.2f} | {r.get('directory', '-')} |"
            )
        lines += ["", "Baselines:", ""]
        for name, b in found["baselines"].items():
            inherited = b.get("inherited_dev")
            shown = "-" if inherited is None else f"{inherited:.4f}"
            lines.append(f"- {name} ({b['arch']}): {b['measured_ms']:.2f} ms measured, dev {metric} {shown} inherited")
        lines.append("")
    if "multi_trial" in found:
        m = found["multi_trial"]
        lines += [
            f"## Multi-trial search ({m['n_finished']} trials of {m['epochs_per_trial']:g} epoch(s))",
            "",
            f"| trial | architecture | state | dev {metric} | predicted ms | GFLOPs spent |",
            "|---|---|---|---|---|---|",
        ]
        for t in m["trials"]:
            lines.append(
                f"| {t['trial']} | {t['arch']} | {t['state']} | {t['dev']:.4f} | {t['predicted_ms']:.2f} | "
                f"{t['trial_flops'] / 1e9:,.0f} |"
            )
        lines.append("")
    c = found["cost"]
    if "supernet_share" in c:
        n, tera = c["supernet_candidates"], 1e12
        lines += [
            "## Cost",
            "",
            f"Supernet: {c['supernet_flops'] / tera:,.1f} TFLOPs for {n} candidates (training + scoring). "
            f"Multi-trial: {c['multi_trial_flops_per_candidate'] / tera:,.2f} TFLOPs per candidate (mean of "
            f"{c['multi_trial_trials_run']} trials), {c['multi_trial_flops_for_same_candidates'] / tera:,.1f} "
            f"TFLOPs for {n}. The supernet spends {c['supernet_share']:.3f}x of that.",
            "",
        ]
    if "retrained" in found:
        rows = found["retrained"]
        baseline = rows[next(iter(found["baselines"]))]
        lines += [
            "## Retrained from scratch with one recipe",
            "",
            f"| pick | architecture | measured ms | x baseline latency | dev {metric} | test {metric} |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in rows.items():
            test = r["test"].get(metric)
            ratio = r["measured_ms"] / baseline["measured_ms"]
            lines.append(
                f"| {label} | {r['arch']} | {r['measured_ms']:.2f} | {ratio:.2f} | {r['dev'][metric]:.4f} | "
                f"{'-' if test is None else f'{test:.4f}'} |"
            )
    lines += ["", "![Pareto front](pareto.png)"]
    return "\n".join(lines) + "\n"


def plot(found: dict, path: Path) -> None:
    """Dev metric vs latency: candidates, the Pareto front, multi-trial trials, the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    metric = found["metric"]
    if "supernet" in found:
        s = found["supernet"]
        ax.scatter(
            [r["predicted_ms"] for r in s["candidates"]],
            [r["dev"] for r in s["candidates"]],
            s=10,
            color="0.7",
            label="supernet candidates (predicted ms, inherited weights)",
        )
        ax.plot(
            [r["measured_ms"] for r in s["pareto"]],
            [r["dev"] for r in s["pareto"]],
            "o-",
            color="C0",
            label="Pareto front (measured ms)",
        )
    if "multi_trial" in found:
        trials = [t for t in found["multi_trial"]["trials"] if t["state"] == "complete"]
        ax.scatter(
            [t["predicted_ms"] for t in trials],
            [t["dev"] for t in trials],
            marker="^",
            color="C1",
            label="multi-trial (brief training)",
        )
    for name, b in found["baselines"].items():
        retrained = found.get("retrained", {}).get(name)
        y = b.get("inherited_dev", retrained["dev"][metric] if retrained else None)
        if y is not None:
            ax.scatter([b["measured_ms"]], [y], marker="*", s=180, color="C3", zorder=3)
            ax.annotate(name, (b["measured_ms"], y), textcoords="offset points", xytext=(6, 6))
        else:
            ax.axvline(b["measured_ms"], color="C3", linestyle=":", label=f"{name} latency")
    ax.set_xlabel("latency (ms per batch)")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title("accuracy vs latency on this machine")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
