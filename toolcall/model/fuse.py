"""A LoRA adapter merged into the weights it adapts, in memory, with mlx-lm's own per-layer ``fuse()``.

A fused layer computes ``x @ (W + scale * (A @ B)).T`` where the adapted one
computes ``x @ W.T + scale * (x @ A) @ B``: the same function up to float
rounding, one matmul instead of three per adapted projection. Greedy eval
outputs of the committed SFT adapter are identical either way (200/200,
``make serving``); the eval stage decodes with the fused model. For inference
only: the LoRA matrices are gone, nothing is left to train.
"""

import mlx.core as mx
from mlx.utils import tree_unflatten


def fuse_lora(model):
    """Replace each LoRA layer of ``model`` by its fused linear layer, weights computed now; returns how many."""
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
        mx.eval(model.parameters())
    return len(fused)
