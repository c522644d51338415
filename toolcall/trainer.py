"""The two LoRA training loops: mlx-lm's trainer for SFT-style losses, our own for DPO and GRPO.

``train_lora`` runs ``mlx_lm.tuner.trainer.train`` (compiled step, gradient
accumulation, gradient all-reduce under ``mlx.launch``) with our completion
loss and length-bucketed batches. ``optimize`` is the same compiled Adam step
written out, because DPO and GRPO report per-step metrics beside the loss
(reward margin, preference accuracy, KL) and mlx-lm's step passes on only
``(loss, ntoks)``. Both use ``make_optimizer``'s schedule, report through
``progress.Progress`` and dvclive, stop on a non-finite loss, and save and
resume a ``checkpoint.Checkpoint`` when given one.
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
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import build_schedule

from . import launch
from .batches import iterate_batches
from .errors import UserError
from .loss import sft_loss
from .progress import Progress


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

    A non-finite loss raises ``DivergedError`` before anything is logged or
    checkpointed, so the last checkpoint stays the last good state.
    """

    def __init__(self, live, prefix, total):
        self.live, self.prefix = live, prefix
        self.progress = Progress(prefix, total, unit="step", every=0)
        self.history = []

    def __call__(self, step, metrics, shown=None):
        """Record ``metrics`` of ``step``; ``shown`` (speeds: they vary run to run) are printed, not kept."""
        if not math.isfinite(metrics["loss"]):
            raise DivergedError(f"{self.prefix}: the loss is {metrics['loss']} at step {step}; "
                                "lower the learning rate (or raise warmup) and rerun")
        self.history.append({"step": step, **metrics})
        self.progress.update(step - self.progress.done, **metrics, **(shown or {}))
        self._log(metrics)

    def replay(self, history):
        """Take over a resumed run's history (and show it to dvclive again: DVC cleared its plots)."""
        for row in history:
            self.history.append(row)
            self._log({k: v for k, v in row.items() if k != "step"})
        self.progress.done = history[-1]["step"] if history else 0

    def _log(self, metrics):
        if self.live is not None:
            for key, value in metrics.items():
                self.live.log_metric(f"{self.prefix}/{key}", value)
            self.live.next_step()

    def last(self, n=10):
        """Mean of each logged value over the last ``n`` steps (one step is noisy)."""
        tail = self.history[-n:]
        return {k: round(float(np.mean([h[k] for h in tail])), 4) for k in tail[0] if k != "step"} if tail else {}


class _Reports(TrainingCallback):
    """mlx-lm's training reports (steps counted from ``start``) into a ``StepLog``, checkpointing when due."""

    def __init__(self, log, start, save):
        self.log, self.start, self.save = log, start, save

    def on_train_loss_report(self, info):
        step = self.start + info["iteration"]
        self.log(step, {"loss": info["train_loss"], "learning_rate": info["learning_rate"]},
                 shown={"target_tokens_per_s": round(info["tokens_per_second"])})
        self.save(step)


def _resume(model, optimizer, checkpoint, log):
    """The step to start from: a matching checkpoint's, else 0 (the same on every rank)."""
    meta = checkpoint.resume(model, optimizer) if checkpoint else None
    first = 0 if meta is None else meta["step"]
    launch.agree(str(first).encode(), "the step to resume from",
                 f"keep {checkpoint and checkpoint.dir} on storage every host sees, or delete it to start over")
    if meta is not None:
        log.replay(meta["history"])
    return first


def _saver(model, optimizer, checkpoint, log):
    def save(step):
        if checkpoint is not None and checkpoint.due(step):
            checkpoint.save(step, model, optimizer, log.history)

    return save


def train_lora(model, examples, cfg, live=None, prefix="train", checkpoint=None):
    """Train the model's LoRA parameters on ``(tokens, prompt_len)`` examples; ``cfg``: a ``TrainConfig``.

    Returns ``{"train_seconds", "steps", "history"}`` (``steps`` this process
    ran); history rows hold the step and the mean loss since the previous report. With a ``checkpoint`` (whose
    ``every`` is a multiple of ``steps_per_report`` and ``grad_accumulation``:
    saves happen at reports, between whole updates) a rerun resumes where the
    last one saved.
    """
    mx.random.seed(cfg.seed)
    optimizer = make_optimizer(cfg)
    log = StepLog(live, prefix, cfg.iters)
    first = _resume(model, optimizer, checkpoint, log)
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
    if args.iters > 0:
        train(model, optimizer, examples, args=args, loss=sft_loss(model), iterate_batches=batches,
              training_callback=_Reports(log, first, _saver(model, optimizer, checkpoint, log)))
    return {"train_seconds": round(time.perf_counter() - start, 1), "steps": args.iters, "history": log.history}


def optimize(model, cfg, loss_fn, batches, log, checkpoint=None):
    """``cfg.iters`` Adam steps on ``loss_fn(model, *batch) -> (loss, {name: scalar})``.

    ``cfg`` is a ``TrainConfig`` (seed, learning_rate, warmup, iters); ``log``
    (a ``StepLog``) gets plain floats after each step. With a ``checkpoint``
    a rerun resumes where the last one saved, skipping the batches it used.
    Under data-parallel ranks ``batches`` yields this rank's share of each
    batch; the gradients are averaged across the ranks before the update
    (as in mlx-lm's trainer), and ``log`` gets the loss and metrics averaged
    across them.
    """
    mx.random.seed(cfg.seed)
    optimizer = make_optimizer(cfg)
    first = _resume(model, optimizer, checkpoint, log)
    save = _saver(model, optimizer, checkpoint, log)
    for _ in range(first):
        next(batches)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (loss, metrics), grad = value_and_grad(model, *batch)
        optimizer.update(model, average_gradients(grad))  # unchanged in one process
        return loss, metrics

    model.train()
    for it, batch in zip(range(first + 1, cfg.iters + 1), batches):
        loss, metrics = step(*batch)
        mx.eval(state, loss, metrics)
        loss, metrics = launch.mean_over_ranks((loss, metrics))
        log(it, {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
        save(it)
    model.eval()
