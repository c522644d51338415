"""The tiny model trained for real (a few tiny steps) on one tool-calling request.

The tiny random model never emits a ``<tool_call>`` by chance. Two honest stand-ins:

* ``train_tool_caller``: all weights fine-tuned until greedy decoding answers
  MESSAGES with CALLS, saved as a model snapshot (for the server test). A LoRA
  on this model cannot do it: with random tied embeddings and a unit final norm
  its logits stay within about +-4, and rank-8 updates plateau at the unigram loss.
* ``train_lora_adapter``: a LoRA adapter in mlx-lm's layout after a few steps
  on the same example: non-zero, so fusing it changes the weights (for the export tests).

Deterministic: same weights on every call.
"""

import json
import shutil
from pathlib import Path

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load, save_model

from toolcall.calls.prompts import PromptFormat

# One request a client might send, and the calls the model learns to answer it with.
MESSAGES = [{"role": "user", "content": "What is the weather in Paris and in Rome, in celsius?"}]
FUNCTIONS = [{
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "dict", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]},
}]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
         {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _fit(model, tokenizer, steps, learning_rate):
    """Adam on the completion tokens of the one example; returns the last loss."""
    fmt = PromptFormat(tokenizer)
    prompt = fmt.encode(fmt.prompt(MESSAGES, FUNCTIONS))
    tokens = mx.array([prompt + fmt.encode(fmt.completion(MESSAGES, FUNCTIONS, CALLS))])

    def loss_fn(model):
        logits = model(tokens[:, :-1])[:, len(prompt) - 1:]
        return nn.losses.cross_entropy(logits, tokens[:, len(prompt):], reduction="mean")

    opt = optim.Adam(learning_rate=learning_rate)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
    return loss.item()


def train_tool_caller(model_dir, out_dir, steps=60, seed=0):
    """Fine-tune every weight of ``model_dir`` on the example; write a snapshot to ``out_dir``."""
    mx.random.seed(seed)
    model, tokenizer = load(str(model_dir))
    loss = _fit(model, tokenizer, steps, 3e-3)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(Path(model_dir) / name, out_dir / name)
    return out_dir, loss


def train_lora_adapter(model_dir, out_dir, steps=20, learning_rate=1e-2, seed=0):
    """A LoRA adapter (mlx-lm layout) on every linear of ``model_dir``, after ``steps`` steps."""
    mx.random.seed(seed)
    model, tokenizer = load(str(model_dir))
    n_layers = len(model.layers)
    model.freeze()
    linear_to_lora_layers(model, n_layers, LORA)
    loss = _fit(model, tokenizer, steps, learning_rate)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": n_layers, "lora_parameters": LORA}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir, loss
