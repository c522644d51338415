"""A tiny random llama in MLX format, a stand-in for the real model in fast tests.

``make_tiny_model(dir)`` writes what an HF/MLX snapshot holds (config.json,
model.safetensors, tokenizer files with a ChatML template) so tests can use it
as a ``model.source: local`` input. Deterministic: same files on every call.
"""

import json
from pathlib import Path

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.utils import save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plain ChatML that ignores ``tools``, like SmolLM2's template (minus its default system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Text to learn a few dozen merges from, so prompts are not one token per byte.
_SAMPLE = (
    'What is the weather in Paris? {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "The capital of France is Paris. Call the function with the right arguments.\n"
    '[{"type": "function", "function": {"name": "calculate", "parameters": {"type": "object"}}}]\n'
) * 4
NUM_MERGES = 64


def make_tokenizer():
    """Byte-level BPE: special tokens (ids 0-2), the 256 byte symbols, NUM_MERGES learned merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + NUM_MERGES,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator([_SAMPLE], trainer=trainer)
    return tok


def make_tiny_model(out_dir, chat_template=None, seed=0):
    """Write a tiny random llama MLX model directory to ``out_dir``; return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": tok.get_vocab_size(),
        "tie_word_embeddings": True,
        "bos_token_id": tok.token_to_id("<|im_start|>"),
        "eos_token_id": eos,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(out_dir, model)
    save_config(dict(config), out_dir / "config.json")

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=chat_template or CHATML,
        model_max_length=config["max_position_embeddings"],
    )
    hf.save_pretrained(out_dir, save_jinja_files=False)
    (out_dir / "special_tokens_map.json").write_text(json.dumps(hf.special_tokens_map, indent=2) + "\n")
    return out_dir
