"""The two LoRA training loops: mlx-lm's trainer for SFT-style losses, our own for DPO and GRPO.

``train_lora`` runs ``mlx_lm.tuner.trainer.train`` (compiled step, gradient
accumulation, gradient all-reduce under ``mlx.launch``) with our completion
loss and length-bucketed batches. ``optimize`` is the same compiled Adam step
written out, because DPO and GRPO report per-step metrics beside the loss
(reward margin, preference accuracy, KL) and mlx-lm's step passes on only
``(loss, ntoks)``. Given a ``selection.Selection`` either one evaluates the
model's greedy validation accuracy at step 0, every few steps and after the
last, and ends with the weights of the best (SFT also logs the validation
loss at those steps, and stops after the selection's patience). Both use
``make_optimizer``'s schedule, report through ``progress.Progress`` and
dvclive, stop on a non-finite loss, and save and resume a
``checkpoint.Checkpoint`` (the selection's state with it) when given one.
"""

import math
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
from mlx_lm.tuner.utils import build_schedule

from toolcall.errors import UserError
from toolcall.progress import Progress
from toolcall.train import launch
from toolcall.train.batches import iterate_batches
from toolcall.train.loss import sft_loss

# Logged values whose non-finite value means training diverged.
_MUST_BE_FINITE = {"loss": "loss", "val_loss": "validation loss"}


def make_optimizer(cfg):
    """Adam with linear warmup then cosine decay to 0 over the remaining steps."""
    decay_steps = max(cfg.iters - cfg.warmup, 1)
    schedule = build_schedule(
        {"name": "cosine_decay", "arguments": [cfg.learning_rate, decay_steps, 0.0], "warmup": cfg.warmup}
    )
    return optim.Adam(learning_rate=schedule)


class DivergedError(UserError):
    """The loss became NaN or infinite; the message names the step."""


class StepLog:
    """Per-step (or per-report) metrics: printed through ``Progress``, kept, and logged to dvclive.

    dvclive's step is the training step (plus ``offset``: RL's rounds continue
    one curve), so a curve's x axis is the step a metric names. A row may hold
    only some metrics (a validation loss at step 0, held-out scores every few
    steps). A non-finite loss raises ``DivergedError`` before anything is
    logged or checkpointed, so the last checkpoint stays the last good state.
    """

    def __init__(self, live, prefix, total, offset=0):
        self.live, self.prefix, self.offset = live, prefix, offset
        self.progress = Progress(prefix, total, unit="step", every=0)
        self.history = []

    def __call__(self, step, metrics, shown=None):
        """Record ``metrics`` of ``step``; ``shown`` (speeds: they vary run to run) are printed, not kept."""
        for key, name in _MUST_BE_FINITE.items():
            if key in metrics and not math.isfinite(metrics[key]):
                raise DivergedError(f"{self.prefix}: the {name} is {metrics[key]} at step {step}; "
                                    "lower the learning rate (or raise warmup) and rerun")
        self.history.append({"step": step, **metrics})
        self.progress.update(step - self.progress.done, **metrics, **(shown or {}))
        self._log(step, metrics)

    def replay(self, history):
        """Take over a resumed run's history (and show it to dvclive again: DVC cleared its plots)."""
        for row in history:
            self.history.append(row)
            self._log(row["step"], {k: v for k, v in row.items() if k != "step"})
        self.progress.done = history[-1]["step"] if history else 0

    def _log(self, step, metrics):
        if self.live is not None:
            self.live.step = self.offset + step
            for key, value in metrics.items():
                self.live.log_metric(f"{self.prefix}/{key}", value)
            self.live.next_step()

    def last(self, n=10):
        """Mean over the last ``n`` training steps' rows (one step is noisy) of each value that all of them hold."""
        tail = [h for h in self.history if "loss" in h][-n:]  # not step 0's evaluation-only row
        keys = [k for k in (tail[0] if tail else {}) if k != "step" and all(k in h for h in tail)]
        return {k: round(float(np.mean([h[k] for h in tail])), 4) for k in keys}

    def latest(self, key):
        """The last logged value of ``key`` (None if never logged)."""
        return next((h[key] for h in reversed(self.history) if key in h), None)


class _EarlyStop(Exception):
    """Raised from a training report when the validation accuracy has stopped improving."""


def validation_loss(model, examples, cfg):
    """The mean completion loss of ``examples`` (each once) with mlx-lm's ``evaluate``: a cheap curve, not a choice."""
    def batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        return iterate_batches(dataset, batch_size, max_seq_length, False, cfg.seed, comm_group)

    value = evaluate(model, examples, min(cfg.batch_size, len(examples)), num_batches=-1, max_seq_length=None,
                     loss=sft_loss(model), iterate_batches=batches)
    model.train()  # evaluate() leaves it in eval mode (LoRA dropout off)
    return value


class _Evaluations:
    """SFT's evaluations: at step 0, every ``every`` steps and after the last, at training reports.

    mlx-lm's own validation (``TrainingArgs.steps_per_eval``) runs before a
    step, so it measures step ``it - 1`` and never the final weights; these
    run after the step, where checkpoints are saved too. Each logs the
    ``selection``'s metrics (which choose the adapter) and, given ``examples``,
    their validation loss.
    """

    def __init__(self, model, cfg, every, selection, examples):
        self.model, self.cfg, self.every, self.selection, self.examples = model, cfg, every, selection, examples

    def due(self, step):
        return step in (0, self.cfg.iters) or (self.every > 0 and step % self.every == 0)

    def __call__(self, step):
        metrics = {"val_loss": validation_loss(self.model, self.examples, self.cfg)} if self.examples else {}
        return {**metrics, **self.selection(step)}


class _Reports(TrainingCallback):
    """mlx-lm's training reports (steps counted from ``start``) into a ``StepLog``, checkpointing when due."""

    def __init__(self, log, start, save, evaluations=None):
        self.log, self.start, self.save, self.evaluations = log, start, save, evaluations

    def on_train_loss_report(self, info):
        step = self.start + info["iteration"]
        metrics = {"loss": info["train_loss"], "learning_rate": info["learning_rate"]}
        if self.evaluations is not None and self.evaluations.due(step):
            metrics.update(self.evaluations(step))
        self.log(step, metrics, shown={"target_tokens_per_s": round(info["tokens_per_second"])})
        self.save(step)
        if self.evaluations is not None and self.evaluations.selection.exhausted():
            raise _EarlyStop


def _resume(model, optimizer, checkpoint, log, selection=None):
    """The step to start from: a matching checkpoint's, else 0 (the same on every rank)."""
    meta = checkpoint.resume(model, optimizer) if checkpoint else None
    first = 0 if meta is None else meta["step"]
    launch.agree(str(first).encode(), "the step to resume from",
                 f"keep {checkpoint and checkpoint.dir} on storage every host sees, or delete it to start over")
    if meta is not None:
        log.replay(meta["history"])
        if selection is not None:
            selection.load(meta["extra"]["selection"], meta["tensors"])
    return first


def _saver(model, optimizer, checkpoint, log, selection=None):
    def save(step):
        if checkpoint is not None and checkpoint.due(step):
            extra, tensors = selection.state() if selection is not None else (None, None)
            checkpoint.save(step, model, optimizer, log.history,
                            extra=extra and {"selection": extra}, tensors=tensors)

    return save


def train_lora(model, examples, cfg, live=None, prefix="train", checkpoint=None, selection=None, valid=None,
               steps_per_eval=0, log=None):
    """Train the model's LoRA parameters on ``(tokens, prompt_len)`` examples; ``cfg``: a ``TrainConfig``.

    Returns ``{"train_seconds", "steps", "last_step", "history"}`` (``steps``
    this process ran; ``last_step`` the last one trained); history rows hold
    the step and the mean loss since the previous report. With a ``checkpoint``
    (whose ``every`` is a multiple of ``steps_per_report`` and
    ``grad_accumulation``: saves happen at reports, between whole updates) a
    rerun resumes where the last one saved. With a ``selection`` (see
    ``_Evaluations``; ``steps_per_eval`` a multiple of the report interval)
    the model ends with the weights of the best validation accuracy, training
    stops once the selection is ``exhausted()``, and the result adds
    ``chosen_step`` and ``stopped_early``; ``valid``: ``(tokens, prompt_len)``
    examples whose loss is logged at the same steps (``val_loss``).
    ``log``: a ``StepLog`` to report into (default: a new one under ``prefix``).
    """
    mx.random.seed(cfg.seed)
    optimizer = make_optimizer(cfg)
    log = log if log is not None else StepLog(live, prefix, cfg.iters)
    evaluations = _Evaluations(model, cfg, steps_per_eval, selection, valid) if selection is not None else None
    first = _resume(model, optimizer, checkpoint, log, selection)
    args = TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.iters - first,
        steps_per_report=cfg.steps_per_report,
        steps_per_save=cfg.iters + 1,  # the stage saves once, atomically, at the end
        grad_accumulation_steps=cfg.grad_accumulation,
        adapter_file="/dev/null",
    )

    def batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        return iterate_batches(dataset, batch_size, max_seq_length, loop, cfg.seed, comm_group, skip=first)

    start = time.perf_counter()
    if evaluations is not None and first == 0:
        log(0, evaluations(0))
    stopped_early = selection is not None and selection.exhausted()  # a resumed run may have stopped already
    if args.iters > 0 and not stopped_early:
        try:
            train(model, optimizer, examples, args=args, loss=sft_loss(model), iterate_batches=batches,
                  training_callback=_Reports(log, first, _saver(model, optimizer, checkpoint, log, selection),
                                             evaluations))
        except _EarlyStop:
            stopped_early = True
    last_step = max((h["step"] for h in log.history), default=0)
    result = {"train_seconds": round(time.perf_counter() - start, 1), "steps": last_step - first,
              "last_step": last_step, "history": log.history}
    if selection is not None:
        selection.restore()
        result.update(chosen_step=selection.chosen_step, stopped_early=stopped_early)
    return result


def optimize(model, cfg, loss_fn, batches, log, checkpoint=None, evaluate=None, every=0, selection=None):
    """``cfg.iters`` Adam steps on ``loss_fn(model, *batch) -> (loss, {name: scalar})``.

    ``cfg`` is a ``TrainConfig`` (seed, learning_rate, warmup, iters,
    max_grad_norm); ``log`` (a ``StepLog``) gets plain floats after each step,
    with the gradient norm before clipping and the learning rate. With a ``checkpoint``
    a rerun resumes where the last one saved, skipping the batches it used.
    ``evaluate(model) -> {name: float}`` (held-out scores), when given, runs
    every ``every`` steps and after the last (``every`` 0: only then), into the same log row.
    A ``selection`` (``selection.Selection``) runs at step 0 (a row of its
    own) and at those steps; the model ends with the weights of its best.
    Under data-parallel ranks ``batches`` yields this rank's share of each
    batch; the gradients are averaged across the ranks before the update
    (as in mlx-lm's trainer), and ``log`` gets the loss and metrics averaged
    across them.
    """
    mx.random.seed(cfg.seed)
    optimizer = make_optimizer(cfg)
    first = _resume(model, optimizer, checkpoint, log, selection)
    save = _saver(model, optimizer, checkpoint, log, selection)
    if selection is not None and first == 0:
        log(0, selection(0))
    for _ in range(first):
        next(batches)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (loss, metrics), grad = value_and_grad(model, *batch)
        grad = average_gradients(grad)  # unchanged in one process
        # Clipped to a global norm of max_grad_norm; None clips at infinity (a scaling by exactly 1), so
        # the norm before clipping is logged either way.
        grad, grad_norm = optim.clip_grad_norm(grad, math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm)
        optimizer.update(model, grad)
        # The rate this update used (the optimizer sets it from the schedule before stepping its count).
        return loss, {**metrics, "grad_norm": grad_norm, "learning_rate": optimizer.learning_rate}

    model.train()
    for it, batch in zip(range(first + 1, cfg.iters + 1), batches):
        loss, metrics = step(*batch)
        mx.eval(state, loss, metrics)
        loss, metrics = launch.mean_over_ranks((loss, metrics))
        row = {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
        if it == cfg.iters or (every > 0 and it % every == 0):
            if evaluate is not None:
                row.update(evaluate(model))
                model.train()
            if selection is not None:
                row.update(selection(it))
        log(it, row)
        save(it)
    if selection is not None:
        selection.restore()
    model.eval()
