"""fit(): the one training loop for every objective and task (pretraining, fine-tuning, NAS).

Tasks differ in data, head, loss and metrics (``tasks/base.py``); the loop does the rest:
global batches split into micro-batches per process, the loss normalised by the number of
targets across all of a step's micro-batches and processes (so accumulation and DDP give the
gradients of the equivalent big batch), mixed precision, clipping, skipping of non-finite steps,
periodic evaluation and best-model tracking, atomic checkpoints and exact resume, and the compute
summary. Per-step seeds (masking, dropout) make a resumed run repeat the uninterrupted one.

SIGTERM (what schedulers, ``docker stop`` and ``timeout`` send) and Ctrl-C stop a run at the end of
the step in progress: every process agrees on the step (the request is summed across processes), a
checkpoint is saved and ``TrainingInterrupted`` is raised (the CLI exits 128 + the signal number, no
traceback). A second signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.data.batching import GlobalBatches, to_device
from lmforge.errors import UserError
from lmforge.files import write_json
from lmforge.models.registry import transformer_blocks
from lmforge.ops.cpu_features import bf16_is_fast
from lmforge.tasks.base import Evaluates, GroupsByLength, LossOutput, SelectsByMetric, Task
from lmforge.train import checkpoint, distributed
from lmforge.train.adversarial import EmbeddingAttack
from lmforge.train.config import TrainConfig
from lmforge.train.logging import RunLogger, measure_peak_flops, plot_curves
from lmforge.train.optim import build_optimizer, build_scheduler


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the settings' doing (a learning rate too high, a precision too low),
    so the command says what diverged and what to try (exit 2), not "internal error"."""


class TrainingInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal after saving a checkpoint."""

    def __init__(self, signal_name: str, step: int, run_dir: Path) -> None:
        super().__init__(f"{signal_name}: checkpoint of step {step} saved; continue with --resume {run_dir}")
        self.signal_name, self.step, self.run_dir = signal_name, step, run_dir
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))


class _StopOnSignal:
    """Turns the first SIGTERM / SIGINT into a request the loop honours at the next step; a second one
    raises KeyboardInterrupt at once. Installed only on the main thread (signals are delivered there)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _LossModule(nn.Module):
    """Model + task loss in one forward, so DDP/FSDP see every parameter use inside forward()."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        return self.task.loss(self.model, batch)


def _collate(task: Task, indices, generator: torch.Generator) -> dict[str, Any]:
    return task.collate([task.train_items[int(i)] for i in indices], generator=generator)


def _generator(seed: int, *parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash((seed, *parts)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def training_precision(precision: str, device: torch.device) -> str:
    """The training precision ``auto`` stands for on ``device``: bf16 where its arithmetic is fast, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_fast(device) else "fp32"


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a batch: tasks with padding say so in ``n_tokens``."""
    return int(batch.get("n_tokens", batch["input_ids"].numel()))


def evaluate(module: nn.Module, task: Task, cfg: TrainConfig, d: distributed.Dist) -> dict[str, float]:
    """Task metrics summed over the first ``eval_batches`` validation micro-batches (fixed masks)."""
    n = min(len(task.val_items), cfg.eval_batches * cfg.micro_batch_size)
    if n == 0:
        return {}
    sums: dict[str, float] = {"loss_sum": 0.0, "n_targets": 0.0}
    was_training = module.training
    module.eval()
    with torch.no_grad(), _autocast(cfg, d.device):
        for start in range(d.rank * cfg.micro_batch_size, n, d.world_size * cfg.micro_batch_size):
            items = [task.val_items[i] for i in range(start, min(start + cfg.micro_batch_size, n))]
            batch = task.collate(items, generator=_generator(cfg.seed, -1, start))
            out = module(to_device(batch, d.device))
            sums["loss_sum"] += float(out.loss_sum)
            sums["n_targets"] += batch["n_targets"]
            for key, v in out.counts.items():
                sums[key] = sums.get(key, 0.0) + v
    module.train(was_training)
    totals = {k: distributed.all_sum(v, d) for k, v in sums.items()}
    return task.metrics(totals)


@dataclass
class _Run:
    """Everything one call of ``fit`` works with: what it trains, the optimizer side, progress and logging."""

    model: nn.Module
    task: Task
    cfg: TrainConfig
    run_dir: Path
    d: distributed.Dist
    accum: int
    state: checkpoint.TrainerState
    module: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    batches: GlobalBatches
    logger: RunLogger
    params: list[nn.Parameter]
    peak: float
    started: float
    selection: str = "loss"
    sign: float = 1.0
    attack: EmbeddingAttack | None = None
    eval_twin: nn.Module | None = None
    on_eval: Callable[[int, dict[str, float], float], None] | None = None
    stop: _StopOnSignal = field(default_factory=lambda: _StopOnSignal())
    window_start: float = 0.0
    window: dict = field(default_factory=lambda: {"tokens": 0, "loss": 0.0, "n": 0.0})
    warnings: list[str] = field(default_factory=list)
    """What made the run too short to learn (``length_warnings``): logged at the start, kept in results.json."""


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    resume: bool = False,
    on_eval: Callable[[int, dict[str, float], float], None] | None = None,
    write_results: bool = True,
) -> dict:
    """Train ``model`` on ``task``; returns the compute summary, also written to ``run_dir/results.json`` unless
    ``write_results`` is False (a recipe that writes its own results.json, once, with the summary in it).

    ``on_eval(step, metrics, train_flops)`` is called after each evaluation (NAS trials report to their
    pruner there; an exception it raises ends the run without a final checkpoint).
    """
    run = _setup(model, task, cfg, Path(run_dir), resume, on_eval)
    try:
        with run.stop:
            stopped_by = _train_steps(run)
    except KeyboardInterrupt:
        run.logger.info(f"interrupted: saving a checkpoint at step {run.state.step}; continue with --resume")
        _save(run)
        run.logger.close()
        raise
    except Exception:
        run.logger.close()
        raise
    if stopped_by is not None:
        run.logger.info(
            f"{stopped_by} received: saving a checkpoint at step {run.state.step}; continue with --resume {run.run_dir}"
        )
        _save(run)
        run.logger.close()
        raise TrainingInterrupted(stopped_by, run.state.step, run.run_dir)
    if not (cfg.eval_interval() and run.state.step % cfg.eval_interval() == 0):
        _evaluate(run)
    _save(run)
    run.logger.close()
    return _finish(run, write_results)


def _accumulation(cfg: TrainConfig, d: distributed.Dist) -> int:
    accum, rest = divmod(cfg.global_batch_size, cfg.micro_batch_size * d.world_size)
    if rest or accum == 0:
        raise UserError(
            f"training.global_batch_size={cfg.global_batch_size} must be a multiple of training.micro_batch_size="
            f"{cfg.micro_batch_size} x {d.world_size} process(es)"
        )
    return accum


def recompute_in_backward(block: nn.Module) -> None:
    """Activation checkpointing of one block (``torch.utils.checkpoint``, non-reentrant, the RNG state kept so that
    dropout draws the same masks when the forward is recomputed); only while gradients are being recorded."""
    from torch.utils.checkpoint import checkpoint as recompute

    forward = block.forward

    def checkpointed(*args, **kwargs):
        if torch.is_grad_enabled():
            return recompute(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    block.forward = checkpointed


def _setup(model, task, cfg: TrainConfig, run_dir: Path, resume: bool, on_eval) -> _Run:
    """Restore a checkpoint (when resuming), wrap the model, build optimizer, schedule, batches and logger."""
    run_dir.mkdir(parents=True, exist_ok=True)
    d = distributed.setup(cfg.device)
    cfg_precision, precision = cfg.precision, training_precision(cfg.precision, d.device)
    cfg = dataclasses.replace(cfg, precision=precision) if precision != cfg.precision else cfg
    accum = _accumulation(cfg, d)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    state = checkpoint.TrainerState()
    ckpt = checkpoint.latest(run_dir) if resume else None
    if ckpt is not None:
        checkpoint.load_model_state(model, ckpt)
        state = checkpoint.load_state(ckpt)
        checkpoint.restore_rng(ckpt)
    model.to(d.device).train()
    # A task that scores the dev set by calling parts of the model (heads, decoding) cannot run on FSDP shards:
    # it scores an unsharded twin, loaded with the gathered weights at each evaluation.
    fsdp = d.enabled and cfg.distributed == "fsdp"
    eval_twin = copy.deepcopy(model) if fsdp and isinstance(task, Evaluates) else None
    module = _LossModule(model, task)
    wrapped = distributed.wrap(module, d, cfg.distributed)
    if cfg.activation_checkpointing:
        for block in transformer_blocks(model):
            recompute_in_backward(block)
    if cfg.compile:  # each transformer block on its own: the heads and losses have data-dependent shapes
        for block in transformer_blocks(model):
            block.compile(dynamic=True)
    attack = None
    if cfg.adversarial != "none":
        attack = EmbeddingAttack(
            model, kind=cfg.adversarial, epsilon=cfg.adv_epsilon, alpha=cfg.adv_alpha, steps=cfg.adv_steps
        )
    optimizer, scheduler = _optimizer(module, cfg, ckpt, d)
    lengths = task.train_lengths if isinstance(task, GroupsByLength) else None  # length-grouped batches
    # the dev metric that picks the best model
    selection, direction = task.selection if isinstance(task, SelectsByMetric) else ("loss", "min")
    logger = RunLogger(run_dir, main=d.is_main, total_steps=cfg.max_steps, start_step=state.step, progress=cfg.progress)
    if ckpt is not None:
        logger.info(f"resumed from {ckpt} (step {state.step})")
    if precision != cfg_precision:
        logger.info(f"training.precision=auto: {precision} on this {d.device.type}")
    warnings = length_warnings(cfg, len(task.train_items))
    for warning in warnings:
        logger.info(f"warning: {warning}")
    peak = cfg.peak_tflops * 1e12 or measure_peak_flops(
        d.device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    )
    return _Run(
        model=model,
        task=task,
        cfg=cfg,
        run_dir=run_dir,
        d=d,
        accum=accum,
        state=state,
        module=module,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16"),
        batches=GlobalBatches(len(task.train_items), cfg.global_batch_size, seed=cfg.seed, lengths=lengths),
        logger=logger,
        params=[p for p in module.parameters() if p.requires_grad],
        peak=peak,
        started=time.perf_counter() - state.seconds,
        selection=selection,
        sign=1.0 if direction == "min" else -1.0,
        attack=attack,
        on_eval=on_eval,
        window_start=time.perf_counter(),
        eval_twin=eval_twin,
        warnings=warnings,
    )


SHORT_RUN_STEPS = 50
"""Fewer optimizer steps than this and a model rarely learns anything from a random or pretrained start."""


def length_warnings(cfg: TrainConfig, n_items: int) -> list[str]:
    """What makes a run too short to learn, said before it starts: fewer than SHORT_RUN_STEPS optimizer steps,
    or a run that ends inside its warm-up (the learning rate never reaches optim.lr)."""
    found = []
    if cfg.max_steps < SHORT_RUN_STEPS:
        epochs = cfg.max_steps * cfg.global_batch_size / max(1, n_items)
        found.append(
            f"this run is only {cfg.max_steps} optimizer step(s) ({n_items} training examples, "
            f"{cfg.global_batch_size} per step, {epochs:.3g} pass(es) over them); a model rarely learns in fewer "
            f"than {SHORT_RUN_STEPS}: lengthen it (--epochs where the command has it, or --training.max-steps), or "
            "give fewer examples per step (--training.global-batch-size and --training.micro-batch-size)"
        )
    warmup = cfg.optim.warmup_for(cfg.max_steps)
    if warmup >= cfg.max_steps:
        found.append(
            f"the run ends inside its warm-up ({warmup} steps of {cfg.max_steps}): the learning rate never reaches "
            f"optim.lr {cfg.optim.lr:g}; lower --training.optim.warmup-steps or --training.optim.warmup-share"
        )
    return found


def _optimizer(module: nn.Module, cfg: TrainConfig, ckpt: Path | None, d: distributed.Dist):
    """The optimizer and learning-rate schedule, restored from ``ckpt`` when resuming."""
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    if ckpt is not None:
        saved = checkpoint.load_optim_state(ckpt)
        distributed.load_optimizer_state(module, optimizer, saved["optimizer"], d, cfg.distributed)
        scheduler.load_state_dict(saved["scheduler"])
    return optimizer, scheduler


def _train_steps(run: _Run) -> str | None:
    """Steps until the budget or a stop; the name of the signal that stopped it, else None."""
    cfg, state = run.cfg, run.state
    while state.step < cfg.max_steps:
        if distributed.all_sum(run.stop.received is not None, run.d) > 0:  # every process stops at this step
            return run.stop.received or "SIGTERM"
        if cfg.max_minutes and time.perf_counter() - run.started > 60 * cfg.max_minutes:
            run.logger.info(f"time limit of {cfg.max_minutes} minutes reached at step {state.step}")
            break
        if cfg.patience and state.evals_since_best >= cfg.patience:
            run.logger.info(
                f"early stop at step {state.step}: no better dev {run.selection} in {cfg.patience} evaluations"
            )
            break
        _step(run)
        if cfg.eval_interval() and state.step % cfg.eval_interval() == 0:
            _evaluate(run)
        # a new best is always saved, so the best checkpoint exists whatever save_every is
        if (cfg.save_every and state.step % cfg.save_every == 0) or state.best_step == state.step:
            _save(run)
    return None


def _step(run: _Run) -> None:
    """One optimizer step: this process's micro-batches, their gradients, the update, the counters, the log."""
    cfg, d, state = run.cfg, run.d, run.state
    ids = run.batches.at(state.step).reshape(d.world_size, run.accum, cfg.micro_batch_size)[d.rank]
    # Seeds follow the micro-batch's place in the global batch, so 1 process x 2 accumulation steps
    # and 2 processes x 1 draw the same masks.
    micro = [_collate(run.task, c, _generator(cfg.seed, state.step, d.rank * run.accum + k)) for k, c in enumerate(ids)]
    n_total = distributed.all_sum(sum(b["n_targets"] for b in micro), d)
    torch.manual_seed(hash((cfg.seed, state.step, d.rank)) & 0x7FFF_FFFF)  # dropout, repeatable on resume
    loss_local, step_flops = _backward(run, micro, n_total)
    loss_sum = distributed.all_sum(loss_local, d)
    norm = _update(run, loss_sum)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    state.step += 1
    state.tokens += int(distributed.all_sum(sum(_tokens(b) for b in micro), d))
    state.flops += distributed.all_sum(step_flops, d)
    state.samples_seen += cfg.global_batch_size
    if math.isfinite(loss_sum):
        run.window["loss"] += loss_sum
        run.window["n"] += n_total
    if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
        _log_window(run, lr, norm)


def _backward(run: _Run, micro: list[dict[str, Any]], n_total: float) -> tuple[float, float]:
    """Gradients of the step's loss (normalised by the targets of all its micro-batches and processes);
    returns this process's summed loss and counted FLOPs. DDP synchronises on the last micro-batch only."""
    cfg, d = run.cfg, run.d
    loss_local, step_flops = 0.0, 0.0
    for k, batch in enumerate(micro):
        last = k == run.accum - 1
        no_sync = d.enabled and cfg.distributed == "ddp" and not last
        with run.wrapped.no_sync() if no_sync else contextlib.nullcontext():
            on_device, scale = to_device(batch, d.device), d.world_size / max(n_total, 1.0)

            def scaled_loss(on_device=on_device, scale=scale):
                with _autocast(cfg, d.device):
                    out = run.wrapped(on_device)
                return out, run.scaler.scale(out.loss_sum * scale)

            out, scaled = scaled_loss()
            scaled.backward()
            if run.attack is not None:  # adds the gradient at adversarially perturbed embeddings
                run.attack.backward(lambda: scaled_loss()[1])
        loss_local += float(out.loss_sum.detach())
        step_flops += run.task.flops(run.model, batch) * (1 if run.attack is None else 1 + run.attack.passes)
        run.window["tokens"] += _tokens(batch)
    return loss_local, step_flops


def _update(run: _Run, loss_sum: float) -> float:
    """Clip and apply the gradients, or skip a non-finite step (too many in a row: TrainingDiverged)."""
    cfg, state = run.cfg, run.state
    run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if math.isfinite(loss_sum) and math.isfinite(float(norm)):
        run.scaler.step(run.optimizer)
        state.bad_in_a_row = 0
    else:
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        run.logger.record("skip", state.step + 1, {"loss_sum": loss_sum, "grad_norm": float(norm)})
        run.logger.info(f"step {state.step + 1}: non-finite loss or gradient, step skipped")
        if state.bad_in_a_row >= cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{state.bad_in_a_row} non-finite steps in a row (up to step {state.step + 1}); the last good "
                f"checkpoint is in {run.run_dir / checkpoint.STATE_DIR}. Lower training.optim.lr or use fp32."
            )
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _log_window(run: _Run, lr: float, norm: float) -> None:
    """The training record since the last one: mean loss per target, learning rate, tokens/s."""
    seconds = time.perf_counter() - run.window_start
    tokens_per_s = distributed.all_sum(run.window["tokens"], run.d) / max(seconds, 1e-9)
    loss = run.window["loss"] / max(run.window["n"], 1.0)
    step = run.state.step
    record = {
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens_per_s": tokens_per_s,
        "epoch": run.batches.epoch_of(step),
    }
    run.logger.record("train", step, record)
    run.logger.progress(step, f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s")
    run.window_start, run.window = time.perf_counter(), {"tokens": 0, "loss": 0.0, "n": 0.0}


def _evaluate(run: _Run) -> None:
    """Score the dev set, log it, report it to ``on_eval`` and track the best step for early stopping."""
    task, state = run.task, run.state
    # fine-tuning tasks score the whole dev set from predictions; every process does (FSDP needs all in step)
    if isinstance(task, Evaluates):
        model = run.model
        if run.eval_twin is not None:  # FSDP: score a whole copy (each process the same; they stay in step)
            run.eval_twin.load_state_dict(distributed.full_model_state(run.module, run.d, run.cfg.distributed))
            model = run.eval_twin
        found = task.evaluate(model, device=run.d.device)
    else:
        found = evaluate(run.wrapped, task, run.cfg, run.d)
    # scalars only: task evaluations also return tables (per-class scores, confusion matrices)
    metrics = {k: v for k, v in found.items() if isinstance(v, (int, float))}
    if not metrics:
        return
    run.logger.record("eval", state.step, metrics)
    run.logger.info(f"step {state.step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))
    if run.on_eval is not None:
        run.on_eval(state.step, metrics, state.flops)
    value = metrics[run.selection] * run.sign
    if state.best_metric is None or value < state.best_metric:
        state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
    else:
        state.evals_since_best += 1


def _save(run: _Run) -> None:
    """A checkpoint of the model, optimizer, schedule and progress (written by the first process)."""
    run.state.seconds = time.perf_counter() - run.started
    model_sd, optim_sd = distributed.full_state_dicts(run.module, run.optimizer, run.d, run.cfg.distributed)
    model_sd = checkpoint.trained_state(run.model, model_sd)
    if run.d.is_main:
        optim_state = {"optimizer": optim_sd, "scheduler": run.scheduler.state_dict()}
        checkpoint.save(
            run.run_dir, model_state=model_sd, optim_state=optim_state, state=run.state, keep_last=run.cfg.keep_last
        )
    distributed.barrier(run.d)


def _finish(run: _Run, write_results: bool) -> dict:
    """The compute summary (results.json of the loop) and the curves."""
    state, d = run.state, run.d
    seconds = time.perf_counter() - run.started
    per_s = max(seconds, 1e-9)
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": state.tokens / per_s,
        "train_flops": state.flops,
        "flops_per_s": state.flops / per_s,
        "peak_flops_per_s": run.peak * d.world_size,
        "mfu": state.flops / per_s / (run.peak * d.world_size),
        "skipped_steps": state.skipped_steps,
        "best_val_loss": state.best_metric if run.selection == "loss" else None,
        "best_dev": None if state.best_metric is None else {run.selection: state.best_metric * run.sign},
        "best_step": state.best_step,
        "processes": d.world_size,
        "warnings": run.warnings,
        "train_config": asdict(run.cfg),
    }
    if d.is_main:
        if write_results:
            write_json(run.run_dir / "results.json", summary)
        plot_curves(run.run_dir)
    return summary
