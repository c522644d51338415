"""The two LoRA training loops: mlx-lm's trainer for SFT-style losses, our own for DPO and GRPO.

``train_lora`` runs ``mlx_lm.tuner.trainer.train`` (compiled step, gradient
accumulation, gradient all-reduce under ``mlx.launch``) with our completion
loss and length-bucketed batches. ``optimize`` is the same compiled Adam step
written out, because DPO and GRPO report per-step metrics beside the loss
(reward margin, preference accuracy, KL) and mlx-lm's step passes on only
``(loss, ntoks)``. Both use ``make_optimizer``'s schedule and report through
``progress.Progress`` and dvclive.
"""

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import build_schedule

from .batches import iterate_batches
from .loss import sft_loss
from .progress import Progress


def make_optimizer(cfg):
    """Adam with linear warmup then cosine decay to 0 over the remaining steps."""
    decay_steps = max(cfg.iters - cfg.warmup, 1)
    schedule = build_schedule(
        {"name": "cosine_decay", "arguments": [cfg.learning_rate, decay_steps, 0.0], "warmup": cfg.warmup}
    )
    return optim.Adam(learning_rate=schedule)


class StepLog:
    """Per-step (or per-report) metrics: printed through ``Progress``, kept, and logged to dvclive."""

    def __init__(self, live, prefix, total):
        self.live, self.prefix = live, prefix
        self.progress = Progress(prefix, total, unit="step", every=0)
        self.history = []

    def __call__(self, step, metrics):
        self.history.append({"step": step, **metrics})
        self.progress.update(step - self.progress.done, **metrics)
        if self.live is not None:
            for key, value in metrics.items():
                self.live.log_metric(f"{self.prefix}/{key}", value)
            self.live.next_step()

    def last(self, n=10):
        """Mean of each logged value over the last ``n`` steps (one step is noisy)."""
        tail = self.history[-n:]
        return {k: round(float(np.mean([h[k] for h in tail])), 4) for k in tail[0] if k != "step"} if tail else {}


class _Reports(TrainingCallback):
    """mlx-lm's training reports into a ``StepLog``."""

    def __init__(self, log):
        self.log = log

    def on_train_loss_report(self, info):
        self.log(info["iteration"], {"loss": info["train_loss"], "learning_rate": info["learning_rate"],
                                     "target_tokens_per_s": info["tokens_per_second"]})


def train_lora(model, examples, cfg, live=None, prefix="train"):
    """Train the model's LoRA parameters on ``(tokens, prompt_len)`` examples; ``cfg``: a ``TrainConfig``.

    Returns ``{"train_seconds", "history"}``; history rows hold the step and
    the mean loss since the previous report.
    """
    mx.random.seed(cfg.seed)
    args = TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.iters,
        steps_per_report=cfg.steps_per_report,
        steps_per_save=cfg.iters + 1,  # the stage saves once, atomically, at the end
        grad_accumulation_steps=cfg.grad_accumulation,
        adapter_file="/dev/null",
    )
    log = StepLog(live, prefix, cfg.iters)

    def batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        return iterate_batches(dataset, batch_size, max_seq_length, loop, cfg.seed, comm_group)

    start = time.perf_counter()
    train(model, make_optimizer(cfg), examples, args=args, loss=sft_loss(model), iterate_batches=batches,
          training_callback=_Reports(log))
    return {"train_seconds": round(time.perf_counter() - start, 1), "history": log.history}


def optimize(model, cfg, loss_fn, batches, on_step):
    """``cfg.iters`` Adam steps on ``loss_fn(model, *batch) -> (loss, {name: scalar})``.

    ``cfg`` is a ``TrainConfig`` (seed, learning_rate, warmup, iters);
    ``on_step(step, {"loss": ..., **metrics})`` gets plain floats after each step.
    """
    mx.random.seed(cfg.seed)
    optimizer = make_optimizer(cfg)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (loss, metrics), grad = value_and_grad(model, *batch)
        optimizer.update(model, grad)
        return loss, metrics

    model.train()
    for it, batch in zip(range(1, cfg.iters + 1), batches):
        loss, metrics = step(*batch)
        mx.eval(state, loss, metrics)
        on_step(it, {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
    model.eval()
