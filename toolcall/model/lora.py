"""LoRA adapters in mlx-lm's own format: put on a model, load, save, snapshot.

We reuse mlx-lm's LoRA layers (``linear_to_lora_layers``) and adapter layout
(``adapter_config.json`` + ``adapters.safetensors``), so ``mlx_lm.load(...,
adapter_path=)``, ``mlx_lm.fuse`` and ``mlx_lm.server`` take our adapters as
they are.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from toolcall.config import ConfigError
from toolcall.errors import ModelError
from toolcall.io import atomic_path, write_json
from toolcall.model import kernels
from toolcall.model.fuse import fuse_lora

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(cfg):
    """mlx-lm's ``adapter_config.json`` content for an ``SftConfig``."""
    return {
        "fine_tune_type": "lora",
        "num_layers": cfg.lora_layers,
        "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout},
    }


def read_adapter_config(adapter_dir):
    with open(Path(adapter_dir) / ADAPTER_CONFIG) as f:
        return json.load(f)


def add_lora(model, config, seed):
    """Freeze the model and put LoRA (shape from an ``adapter_config``) on its last blocks.

    The LoRA ``A`` matrices are drawn from MLX's global RNG, which MLX seeds
    from the clock: it is seeded here, so the same seed gives the same adapter.
    """
    n_blocks = len(model.layers)
    if config["num_layers"] > n_blocks:
        raise ConfigError(f"lora_layers={config['num_layers']} but the model has only {n_blocks} blocks")
    mx.random.seed(seed)
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    return model


def load_model(model_dir, adapter_dir=None, fused=False):
    """A base model (and optionally its adapter) loaded by mlx-lm, with its tokenizer.

    Its hot ops run on the native CPU kernels where they apply (``kernels``;
    ``TOOLCALL_NATIVE=0``: MLX's own ops). ``fused``: the adapter merged into
    the weights (``fuse.fuse_lora``), for inference only (the eval stage).
    """
    from mlx_lm import load

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    if fused and adapter_dir and not fuse_lora(model):
        raise ModelError(f"{adapter_dir}: no adapter layer to fuse")
    kernels.install(model)
    return model, tokenizer


def load_policy(model_dir, adapter_dir):
    """The SFT model with only its LoRA matrices trainable, for DPO and RL to continue.

    ``mlx_lm.load(..., adapter_path=)`` leaves every parameter trainable
    (embeddings, norms, base weights); training them would change far more
    than the adapter, and ``save_adapters`` would write the whole model.
    """
    model, tokenizer = load_model(model_dir, adapter_dir)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    if count_trainable(model) == 0:
        raise ValueError(f"{adapter_dir} holds no LoRA adapter (lora_a/lora_b)")
    return model, tokenizer


def count_trainable(model):
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def save_adapters(model, config, out_dir):
    """Write the trainable weights and ``config`` (an ``adapter_config``) atomically."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.trainable_parameters())))
    write_json(out_dir / ADAPTER_CONFIG, config)


def snapshot(model):
    """The trainable (LoRA) weights as they are now; arrays are immutable, so this is a copy."""
    return tree_flatten(model.trainable_parameters())


def restore(model, weights):
    model.update(tree_unflatten(weights))
