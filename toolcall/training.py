"""LoRA fine-tuning on top of mlx-lm's tuner.

We reuse mlx-lm's LoRA layers (``linear_to_lora_layers``), its training loop
(``trainer.train``: compiled step, gradient accumulation, distributed
all-reduce under ``mlx.launch``) and its adapter format, so ``mlx_lm.load(...,
adapter_path=models/sft)``, ``mlx_lm.fuse`` and ``mlx_lm.server`` take our
adapters as they are. Two pieces are our own, each measured in ``make bench``:

* ``completion_loss``: with the loss on the completion only, the vocabulary
  projection (49k x 576 for SmolLM2) runs only at completion positions instead
  of over the whole prompt; same value as mlx-lm's ``default_loss``.
* ``iterate_batches``: length-bucketed batches that also carry the completion
  positions; same bucketing and rank striding as mlx-lm's.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, default_loss, train
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

from .io import atomic_path, write_json

ADAPTER_FILE = "adapters.safetensors"
# Model families whose forward is body (`model.model`) + vocabulary projection,
# so the projection can be applied to a subset of positions.
_SPLIT_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class ConfigError(ValueError):
    """A params section that cannot be used; the message names the key."""


def from_params(cls, section, name):
    """Build a config dataclass from a params.yaml section, rejecting bad keys and values."""
    section = dict(section or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(f"params.yaml [{name}]: unknown keys {unknown}; known: {sorted(fields)}")
    for key, value in section.items():
        want = type(fields[key].default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            section[key] = float(value)
        elif fields[key].default is not None and not isinstance(value, want):
            raise ConfigError(f"params.yaml [{name}].{key}={value!r}: expected {want.__name__}")
    cfg = cls(**section)
    if hasattr(cfg, "check"):
        for problem in cfg.check():
            raise ConfigError(f"params.yaml [{name}]: {problem}")
    return cfg


@dataclasses.dataclass
class LoraConfig:
    seed: int = 0
    lora_rank: int = 8
    # mlx-lm has no alpha: a LoRA layer adds scale * (x A B). PEFT's alpha/rank
    # = 16/8 (the paper's setting) is scale 2.0.
    lora_scale: float = 2.0
    lora_layers: int = 16
    lora_dropout: float = 0.0
    learning_rate: float = 2e-4
    warmup: int = 10
    iters: int = 200
    batch_size: int = 4
    grad_accumulation: int = 1
    max_seq_len: int = 1024
    mask_prompt: bool = True
    steps_per_report: int = 10

    def check(self):
        if self.lora_rank < 1:
            yield f"lora_rank={self.lora_rank} must be >= 1"
        if self.lora_layers < 1:
            yield f"lora_layers={self.lora_layers} must be >= 1"
        if not 0 <= self.lora_dropout < 1:
            yield f"lora_dropout={self.lora_dropout} must be in [0, 1)"
        if not 0 < self.learning_rate < 1:
            yield f"learning_rate={self.learning_rate} must be in (0, 1)"
        if self.iters < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            yield "iters, batch_size and grad_accumulation must be >= 1"
        if not 0 <= self.warmup < self.iters:
            yield f"warmup={self.warmup} must be in [0, iters)"
        if self.max_seq_len < 16:
            yield f"max_seq_len={self.max_seq_len} is too small"


def add_lora(model, cfg):
    """Freeze the model and put LoRA on the last ``cfg.lora_layers`` blocks."""
    n_blocks = len(model.layers)
    if cfg.lora_layers > n_blocks:
        raise ConfigError(f"lora_layers={cfg.lora_layers} but the model has only {n_blocks} blocks")
    model.freeze()
    linear_to_lora_layers(model, cfg.lora_layers, lora_parameters(cfg))
    return model


def lora_parameters(cfg):
    return {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}


def count_trainable(model):
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------- loss


def _lm_head(model, hidden):
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


def supports_split_head(model):
    return getattr(model, "model_type", None) in _SPLIT_HEAD_TYPES


def completion_loss(model, batch, lengths, positions, weights):
    """Mean cross-entropy over completion tokens; ``(loss, ntoks)`` like mlx-lm's.

    ``positions[b, j]`` is the index (into ``batch[:, :-1]``) of the j-th
    predicted completion token of row b, ``weights`` 1 there and 0 on padding.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = model.model(inputs)
    picked = mx.take_along_axis(hidden, positions[..., None], axis=1)
    logits = _lm_head(model, picked)
    ce = nn.losses.cross_entropy(logits, mx.take_along_axis(targets, positions, axis=1)) * weights
    ntoks = weights.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def full_loss(model, batch, lengths, positions, weights):
    """mlx-lm's ``default_loss`` with our batch layout (for models we cannot split)."""
    return default_loss(model, batch, lengths)


# ---------------------------------------------------------------- batches


def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
    """Length-bucketed batches of ``(tokens, lengths, positions, weights)``.

    ``dataset`` holds ``(token_ids, prompt_length)`` pairs (rows longer than
    ``max_seq_length`` are refused by validation, so none is truncated here).
    Signature and bucketing follow ``mlx_lm.tuner.trainer.iterate_batches``;
    the batch order comes from a private RNG so training is reproducible
    without touching numpy's global state.
    """
    if len(dataset) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} examples, have {len(dataset)}")
    offset, step = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % step:
        raise ValueError("the batch size must be divisible by the number of workers")
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    batches = [order[i + offset : i + batch_size : step] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for b in rng.permutation(len(batches)):
            yield collate([dataset[i] for i in batches[b]])
        if not loop:
            return


def _round_up(n, multiple):
    return multiple * math.ceil(n / multiple)


def collate(examples, pad_to=32):
    """Pad a list of ``(tokens, prompt_len)`` into model-ready arrays.

    Lengths are rounded up to multiples of ``pad_to`` so the compiled step sees
    few distinct shapes.
    """
    width = 1 + _round_up(max(len(t) for t, _ in examples), pad_to)
    n_comp = _round_up(max(len(t) - p for t, p in examples), 8)
    tokens = np.zeros((len(examples), width), np.int32)
    positions = np.zeros((len(examples), n_comp), np.int32)
    weights = np.zeros((len(examples), n_comp), np.float32)
    lengths = []
    for row, (toks, prompt_len) in enumerate(examples):
        tokens[row, : len(toks)] = toks
        # Predicting token t uses the input at t-1; completion tokens are
        # toks[prompt_len:], i.e. input positions prompt_len-1 .. len-2.
        idx = np.arange(max(prompt_len, 1) - 1, len(toks) - 1)
        positions[row, : len(idx)] = idx
        positions[row, len(idx) :] = idx[-1] if len(idx) else 0
        weights[row, : len(idx)] = 1.0
        lengths.append((max(prompt_len, 1), len(toks) - 1))
    return mx.array(tokens), mx.array(lengths), mx.array(positions), mx.array(weights)


# ---------------------------------------------------------------- training


class ProgressCallback(TrainingCallback):
    """Prints progress with tokens/s and ETA, and logs step metrics to dvclive."""

    def __init__(self, total_iters, live=None, prefix="train"):
        self.total, self.live, self.prefix = total_iters, live, prefix
        self.start = time.perf_counter()
        self.history = []

    def on_train_loss_report(self, info):
        it = info["iteration"]
        elapsed = time.perf_counter() - self.start
        eta = elapsed / it * (self.total - it)
        print(
            f"[{self.prefix}] step {it}/{self.total}  loss {info['train_loss']:.4f}  "
            f"{info['tokens_per_second']:.0f} target tok/s  peak {info['peak_memory']:.2f} GB  "
            f"elapsed {elapsed:.0f}s  ETA {eta:.0f}s",
            flush=True,
        )
        self.history.append({k: info[k] for k in ("iteration", "train_loss", "tokens_per_second", "learning_rate")})
        if self.live is not None:
            self.live.log_metric(f"{self.prefix}/loss", info["train_loss"])
            self.live.log_metric(f"{self.prefix}/learning_rate", info["learning_rate"])
            self.live.log_metric(f"{self.prefix}/target_tokens_per_s", info["tokens_per_second"])
            self.live.next_step()


def make_optimizer(cfg):
    decay_steps = max(cfg.iters - cfg.warmup, 1)
    schedule = build_schedule(
        {"name": "cosine_decay", "arguments": [cfg.learning_rate, decay_steps, 0.0], "warmup": cfg.warmup}
    )
    return optim.Adam(learning_rate=schedule)


def train_lora(model, examples, cfg, live=None, prefix="train"):
    """Train the model's LoRA parameters on ``(tokens, prompt_len)`` examples."""
    mx.random.seed(cfg.seed)
    if not cfg.mask_prompt:
        examples = [(t, 1) for t, _ in examples]  # every token after the first is a target
    loss = completion_loss if supports_split_head(model) else full_loss
    args = TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.iters,
        steps_per_report=cfg.steps_per_report,
        steps_per_save=cfg.iters + 1,  # we save once, atomically, at the end
        max_seq_length=cfg.max_seq_len,
        grad_accumulation_steps=cfg.grad_accumulation,
        adapter_file="/dev/null",
    )
    callback = ProgressCallback(cfg.iters, live, prefix)

    def batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        return iterate_batches(dataset, batch_size, max_seq_length, loop, cfg.seed, comm_group)

    start = time.perf_counter()
    train(model, make_optimizer(cfg), examples, args=args, loss=loss, iterate_batches=batches,
          training_callback=callback)
    return {"train_seconds": round(time.perf_counter() - start, 1), "history": callback.history}


def save_adapters(model, cfg, out_dir, extra=None):
    """Write mlx-lm's adapter layout (``adapter_config.json`` + safetensors) atomically."""
    out_dir = Path(out_dir)
    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(out_dir / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), weights)
    config = {
        "fine_tune_type": "lora",
        "num_layers": cfg.lora_layers,
        "lora_parameters": lora_parameters(cfg),
        **(extra or {}),
    }
    write_json(out_dir / "adapter_config.json", config)


def load_model(model_dir, adapter_dir=None):
    """Load a base model (and optionally adapters) with mlx-lm, in train-ready form."""
    from mlx_lm import load

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    return model, tokenizer


def adapter_info(adapter_dir):
    with open(Path(adapter_dir) / "adapter_config.json") as f:
        return json.load(f)
