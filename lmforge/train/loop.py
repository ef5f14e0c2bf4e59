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
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import write_json
from lmforge.data.batching import GlobalBatches, to_device
from lmforge.errors import UserError
from lmforge.tasks.base import LossOutput, Task
from lmforge.train import checkpoint, distributed
from lmforge.train.adversarial import EmbeddingAttack
from lmforge.train.config import TrainConfig
from lmforge.train.logging import RunLogger, measure_peak_flops, plot_curves
from lmforge.train.optim import build_optimizer, build_scheduler


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


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


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    resume: bool = False,
    on_eval: Callable[[int, dict[str, float], float], None] | None = None,
) -> dict:
    """Train ``model`` on ``task``; returns the summary also written to ``run_dir/results.json``.

    ``on_eval(step, metrics, train_flops)`` is called after each evaluation (NAS trials report to their
    pruner there; an exception it raises ends the run without a final checkpoint).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = distributed.setup(cfg.device)
    accum, rest = divmod(cfg.global_batch_size, cfg.micro_batch_size * d.world_size)
    if rest or accum == 0:
        raise UserError(
            f"train.global_batch_size={cfg.global_batch_size} must be a multiple of train.micro_batch_size="
            f"{cfg.micro_batch_size} x {d.world_size} process(es)"
        )
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    state = checkpoint.TrainerState()
    ckpt = checkpoint.latest(run_dir) if resume else None
    if ckpt is not None:
        checkpoint.load_model_state(model, ckpt)
        state = checkpoint.load_state(ckpt)
        checkpoint.restore_rng(ckpt)
    model.to(d.device).train()
    module = _LossModule(model, task)
    wrapped = distributed.wrap(module, d, cfg.distributed)
    if cfg.compile:  # each transformer block on its own: the heads and losses have data-dependent shapes
        for layer in getattr(getattr(model, "encoder", model), "layers", []):
            layer.compile(dynamic=True)
    attack = None
    if cfg.adversarial != "none":
        attack = EmbeddingAttack(
            model, kind=cfg.adversarial, epsilon=cfg.adv_epsilon, alpha=cfg.adv_alpha, steps=cfg.adv_steps
        )
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    if ckpt is not None:
        saved = checkpoint.load_optim_state(ckpt)
        distributed.load_optimizer_state(module, optimizer, saved["optimizer"], d, cfg.distributed)
        scheduler.load_state_dict(saved["scheduler"])
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    lengths = getattr(task, "train_lengths", None)  # length-grouped batches for padded tasks
    batches = GlobalBatches(len(task.train_items), cfg.global_batch_size, seed=cfg.seed, lengths=lengths)
    selection, direction = getattr(task, "selection", ("loss", "min"))  # the dev metric that picks the best model
    sign = 1.0 if direction == "min" else -1.0  # best_metric is stored so that lower is better
    logger = RunLogger(run_dir, main=d.is_main, total_steps=cfg.max_steps, start_step=state.step, progress=cfg.progress)
    if ckpt is not None:
        logger.info(f"resumed from {ckpt} (step {state.step})")
    peak = cfg.peak_tflops * 1e12 or measure_peak_flops(
        d.device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    )
    params = [p for p in module.parameters() if p.requires_grad]
    started = time.perf_counter() - state.seconds
    window_start, window = time.perf_counter(), {"tokens": 0, "loss": 0.0, "n": 0.0}

    def save() -> None:
        state.seconds = time.perf_counter() - started
        model_sd, optim_sd = distributed.full_state_dicts(module, optimizer, d, cfg.distributed)
        if d.is_main:
            optim_state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict()}
            checkpoint.save(
                run_dir, model_state=model_sd, optim_state=optim_state, state=state, keep_last=cfg.keep_last
            )
        distributed.barrier(d)

    def run_eval() -> None:
        # scalars only: task evaluations also return tables (per-class scores, confusion matrices)
        # fine-tuning tasks score the whole dev set from predictions; every process does (FSDP needs all in step)
        found = task.evaluate(model, device=d.device) if hasattr(task, "evaluate") else evaluate(wrapped, task, cfg, d)
        metrics = {k: v for k, v in found.items() if isinstance(v, (int, float))}
        if not metrics:
            return
        logger.record("eval", state.step, metrics)
        logger.info(f"step {state.step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))
        if on_eval is not None:
            on_eval(state.step, metrics, state.flops)
        value = metrics[selection] * sign
        if state.best_metric is None or value < state.best_metric:
            state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
        else:
            state.evals_since_best += 1

    def _train_steps() -> str | None:
        """Steps until the budget or a stop; the name of the signal that stopped it, else None."""
        nonlocal window_start, window
        while state.step < cfg.max_steps:
            if distributed.all_sum(stop.received is not None, d) > 0:  # every process stops at this step
                return stop.received or "SIGTERM"
            if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
                logger.info(f"time limit of {cfg.max_minutes} minutes reached at step {state.step}")
                break
            if cfg.patience and state.evals_since_best >= cfg.patience:
                logger.info(f"early stop at step {state.step}: no better dev {selection} in {cfg.patience} evaluations")
                break
            ids = batches.at(state.step).reshape(d.world_size, accum, cfg.micro_batch_size)[d.rank]
            # Seeds follow the micro-batch's place in the global batch, so 1 process x 2 accumulation steps
            # and 2 processes x 1 draw the same masks.
            micro = [_collate(task, c, _generator(cfg.seed, state.step, d.rank * accum + k)) for k, c in enumerate(ids)]
            n_total = distributed.all_sum(sum(b["n_targets"] for b in micro), d)
            torch.manual_seed(hash((cfg.seed, state.step, d.rank)) & 0x7FFF_FFFF)  # dropout, repeatable on resume
            loss_local, step_flops = 0.0, 0.0
            for k, batch in enumerate(micro):
                sync = (
                    wrapped.no_sync()
                    if d.enabled and cfg.distributed == "ddp" and k < accum - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    on_device, scale = to_device(batch, d.device), d.world_size / max(n_total, 1.0)

                    def scaled_loss(on_device=on_device, scale=scale):
                        with _autocast(cfg, d.device):
                            out = wrapped(on_device)
                        return out, scaler.scale(out.loss_sum * scale)

                    out, scaled = scaled_loss()
                    scaled.backward()
                    if attack is not None:  # adds the gradient at adversarially perturbed embeddings
                        attack.backward(lambda: scaled_loss()[1])
                loss_local += float(out.loss_sum.detach())
                step_flops += task.flops(model, batch) * (1 if attack is None else 1 + attack.passes)
                window["tokens"] += _tokens(batch)
            loss_sum = distributed.all_sum(loss_local, d)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if math.isfinite(loss_sum) and math.isfinite(float(norm)):
                scaler.step(optimizer)
                state.bad_in_a_row = 0
            else:
                state.skipped_steps += 1
                state.bad_in_a_row += 1
                logger.record("skip", state.step + 1, {"loss_sum": loss_sum, "grad_norm": float(norm)})
                logger.info(f"step {state.step + 1}: non-finite loss or gradient, step skipped")
                if state.bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"{state.bad_in_a_row} non-finite steps in a row (up to step {state.step + 1}); the last "
                        f"good checkpoint is in {run_dir / checkpoint.STATE_DIR}. Lower train.optim.lr or use fp32."
                    )
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
            state.tokens += int(distributed.all_sum(sum(_tokens(b) for b in micro), d))
            state.flops += distributed.all_sum(step_flops, d)
            state.samples_seen += cfg.global_batch_size
            if math.isfinite(loss_sum):
                window["loss"] += loss_sum
                window["n"] += n_total
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                seconds = time.perf_counter() - window_start
                tokens_per_s = distributed.all_sum(window["tokens"], d) / max(seconds, 1e-9)
                loss = window["loss"] / max(window["n"], 1.0)
                record = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(norm),
                    "tokens_per_s": tokens_per_s,
                    "epoch": batches.epoch_of(state.step),
                }
                logger.record("train", state.step, record)
                logger.progress(state.step, f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s")
                window_start, window = time.perf_counter(), {"tokens": 0, "loss": 0.0, "n": 0.0}
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                run_eval()
            # a new best is always saved, so the best checkpoint exists whatever save_every is
            if (cfg.save_every and state.step % cfg.save_every == 0) or state.best_step == state.step:
                save()
        return None

    stop = _StopOnSignal()
    try:
        with stop:
            stopped_by = _train_steps()
    except KeyboardInterrupt:
        logger.info(f"interrupted: saving a checkpoint at step {state.step}; continue with --resume")
        save()
        logger.close()
        raise
    except Exception:
        logger.close()
        raise
    if stopped_by is not None:
        logger.info(
            f"{stopped_by} received: saving a checkpoint at step {state.step}; continue with --resume {run_dir}"
        )
        save()
        logger.close()
        raise TrainingInterrupted(stopped_by, state.step, run_dir)
    if not (cfg.eval_every and state.step % cfg.eval_every == 0):
        run_eval()
    save()
    logger.close()
    seconds = time.perf_counter() - started
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": state.tokens / max(seconds, 1e-9),
        "train_flops": state.flops,
        "flops_per_s": state.flops / max(seconds, 1e-9),
        "peak_flops_per_s": peak * d.world_size,
        "mfu": state.flops / max(seconds, 1e-9) / (peak * d.world_size),
        "skipped_steps": state.skipped_steps,
        "best_val_loss": state.best_metric if selection == "loss" else None,
        "best_dev": None if state.best_metric is None else {selection: state.best_metric * sign},
        "best_step": state.best_step,
        "processes": d.world_size,
        "train_config": asdict(cfg),
    }
    if d.is_main:
        write_json(run_dir / "results.json", summary)
        plot_curves(run_dir)
    return summary
