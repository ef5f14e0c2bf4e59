"""The two search strategies, both driven by Optuna, and the Pareto front of their results.

* One-shot (``score_with_supernet``): candidates are scored on the dev set with weights inherited
  from a trained ``Supernet`` (no training per candidate), chosen by NSGA-II (Deb et al., 2002;
  Optuna's ``NSGAIISampler``) for two objectives: dev metric up, predicted latency down.
  Constraint violations (parameters, latency) are passed to NSGA-II's constrained domination.
* Multi-trial (``multi_trial``): each Optuna trial trains its candidate briefly through the one
  training loop and reports its dev metric at every evaluation; TPE (Bergstra et al., 2011) with the
  latency constraint proposes candidates and the median pruner stops the unpromising ones. The
  study lives in SQLite: running again continues it (a trial that was running when the process
  died is marked failed and its architecture is tried again).

Compute is counted in FLOPs for both: training FLOPs from the loop, and forward FLOPs of every dev
evaluation (``forward_flops`` over the dev set's tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from lmforge.nas.latency import LatencyModel
from lmforge.nas.space import Arch, SearchSpace, count_params, forward_flops
from lmforge.train.config import TrainConfig
from lmforge.train.loop import fit

log = logging.getLogger(__name__)
DIMENSIONS = ("n_layers", "d_model", "n_heads", "d_ff")


def dev_eval_flops(arch: Arch, lengths: list[int]) -> float:
    """Forward FLOPs of one pass over the dev set (its sequences' token counts)."""
    return sum(forward_flops(arch, batch=1, seq_len=n) for n in lengths)


def constraint_values(arch: Arch, space: SearchSpace, latency: LatencyModel, base) -> dict[str, float]:
    """Each constraint's value, <= 0 where ``arch`` meets it (Optuna's convention)."""
    values = {"heads_divide_width": 0.0 if arch.d_model % arch.n_heads == 0 else 1.0}
    if space.max_params:
        values["params"] = float(count_params(arch, base) - space.max_params)
    if space.max_latency_ms:
        values["latency_ms"] = latency.predict(arch) - space.max_latency_ms
    return values


def _constrain(trial: optuna.Trial, arch: Arch, space: SearchSpace, latency: LatencyModel, base) -> dict[str, float]:
    values = constraint_values(arch, space, latency, base)
    for key, value in values.items():
        trial.set_constraint(key, value)
    return values


def _suggest(trial: optuna.Trial, space: SearchSpace) -> Arch:
    return Arch(*(trial.suggest_categorical(k, getattr(space, k)) for k in DIMENSIONS))


def score_with_supernet(
    score: Callable[[Arch], float],
    *,
    space: SearchSpace,
    latency: LatencyModel,
    base,
    n_candidates: int,
    population: int,
    seed: int,
    dev_lengths: list[int],
) -> tuple[list[dict], float]:
    """NSGA-II over the space until ``n_candidates`` distinct feasible architectures are scored by
    ``score(arch)`` (the dev metric with inherited weights); returns their rows and the FLOPs spent."""
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    scored: dict[Arch, dict] = {}
    spent = 0.0

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        nonlocal spent
        arch = _suggest(trial, space)
        violations = _constrain(trial, arch, space, latency, base)
        predicted = latency.predict(arch)
        if any(v > 0 for v in violations.values()):
            return 0.0, predicted
        if arch not in scored:
            scored[arch] = candidate_row(arch, base, latency, dev=score(arch))
            spent += dev_eval_flops(arch, dev_lengths)
        return scored[arch]["dev"], predicted

    def enough(study: optuna.Study, _trial) -> None:
        if len(scored) >= n_candidates:
            study.stop()

    feasible = sum(all(v <= 0 for v in constraint_values(a, space, latency, base).values()) for a in space.archs())
    if feasible < n_candidates:
        log.warning("the space holds %d feasible architectures, fewer than %d candidates", feasible, n_candidates)
    study.optimize(objective, n_trials=50 * n_candidates, callbacks=[enough])
    return list(scored.values()), spent


def candidate_row(arch: Arch, base, latency: LatencyModel, **extra: Any) -> dict:
    return {
        "arch": arch.name,
        **dataclasses.asdict(arch),
        "params": count_params(arch, base),
        "flops": forward_flops(arch, batch=latency.batch, seq_len=latency.seq_len),
        "predicted_ms": latency.predict(arch),
        **extra,
    }


def open_study(path: Path, *, seed: int, space: SearchSpace, latency: LatencyModel, base) -> optuna.Study:
    """The multi-trial study stored at ``path`` (created, or continued: stale running trials failed and retried)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    study = optuna.create_study(
        study_name="nas",
        storage=f"sqlite:///{path}",
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        log.info("trial %d was interrupted: marked failed, its architecture will be tried again", t.number)
        study.tell(t.number, state=states.FAIL)
    done = {_key(t.params) for t in study.get_trials(deepcopy=False) if t.state != states.FAIL}
    for t in study.get_trials(deepcopy=False, states=(states.FAIL,)):
        if _key(t.params) not in done:
            study.enqueue_trial(t.params)
            done.add(_key(t.params))
    return study


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = optuna.trial.TrialState
    return study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))


def multi_trial(
    study: optuna.Study,
    *,
    n_trials: int,
    build: Callable[[Arch], nn.Module],
    task: Any,
    training: TrainConfig,
    space: SearchSpace,
    latency: LatencyModel,
    base,
    run_dir: Path,
    dev_lengths: list[int],
) -> list[dict]:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) ones; returns every
    finished trial's row (dev metric, FLOPs spent, state)."""
    metric = task.selection[0]

    def objective(trial: optuna.Trial) -> float:
        arch = _suggest(trial, space)
        violations = _constrain(trial, arch, space, latency, base)
        trial.set_user_attr("flops", 0.0)
        if violations["heads_divide_width"] > 0:  # no such model: nothing to train
            raise optuna.TrialPruned(f"{arch.name}: n_heads does not divide d_model")
        if any(v > 0 for v in violations.values()):
            return 0.0
        earlier = _same_architecture(study, trial.params)
        if earlier is not None:  # TPE proposes known points again in small spaces: no second training
            trial.set_user_attr("duplicate_of", earlier.number)
            return float(earlier.value)
        trial_dir = run_dir / f"trial-{trial.number:04d}"
        shutil.rmtree(trial_dir, ignore_errors=True)
        torch.manual_seed(training.seed)
        model = build(arch)
        per_eval = dev_eval_flops(arch, dev_lengths)
        evals = 0

        def report(step: int, metrics: dict[str, float], flops: float) -> None:
            nonlocal evals
            evals += 1
            trial.set_user_attr("flops", flops + evals * per_eval)
            trial.report(metrics[metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{arch.name}: dev {metric} {metrics[metric]:.4f} at step {step}")

        summary = fit(model, task, training, run_dir=trial_dir, on_eval=report)
        trial.set_user_attr("flops", summary["train_flops"] + evals * per_eval)
        return float(summary["best_dev"][metric])

    remaining = n_trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    rows = []
    for t in finished_trials(study):
        arch = Arch(*(t.params[k] for k in DIMENSIONS))
        if arch.d_model % arch.n_heads or "duplicate_of" in t.user_attrs:
            continue
        dev = t.value if t.state == optuna.trial.TrialState.COMPLETE else max(t.intermediate_values.values(), default=0)
        rows.append(
            candidate_row(
                arch,
                base,
                latency,
                dev=dev,
                trial=t.number,
                state=t.state.name.lower(),
                trial_flops=t.user_attrs.get("flops", 0.0),
            )
        )
    return rows


def _same_architecture(study: optuna.Study, params: dict) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in complete if t.params == params), None)


def pareto_front(rows: list[dict], *, metric: str = "dev", cost: str = "predicted_ms") -> list[dict]:
    """The rows no other row beats on both ``metric`` (higher) and ``cost`` (lower), cheapest first."""
    front = []
    for r in sorted(rows, key=lambda r: (r[cost], -r[metric])):
        if not front or r[metric] > front[-1][metric]:
            front.append(r)
    return front
