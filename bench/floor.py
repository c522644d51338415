"""The eval's floor: the least time its items' work can take on this machine.

``eval_work`` counts what the eval's greedy decoding of its items needs,
whatever the implementation, from the model's shape, each item's prompt and
output lengths and the decode steps the eval ran:

* prefill: every prompt token but the last through the blocks' matmuls,
  ``2 x block params`` FLOPs each, plus causal attention's ``4 x heads x
  head_dim`` per (query, visible key) pair; no output head (no prompt
  position's logits are read).
* decode: one forward pass per sampled token (the output, and its
  end-of-turn token unless it stopped at max_tokens), the first of them on
  the prompt's last token: ``2 x (block + head params)`` FLOPs plus attention
  over the prompt and the tokens before it. Bytes: every decode step (a
  batched pass of one process) reads all the weights, and each pass reads
  its row's keys and values (real positions only, no padding) as the KV cache
  holds them: float16 on the native kernels' path (``kernels``), else the
  weights' dtype.

``eval_floor`` prices it at the machine's ceilings: the prefill's FLOPs at
the matmul section's GFLOP/s, plus the decode at the larger of its FLOPs at
that rate and its bytes at the memory section's GB/s (it is bound by one or
the other, both at once at best). Both ceilings are machine-wide (every
core), as the work is summed over the eval's processes.

``counted_generate`` is the eval's ``generate`` that also reports the decode
steps its process ran, for the eval section's sharded arm to pass to ``eval_work``.
"""

import json
import struct
from pathlib import Path

from bench.common import model_shape

# Bytes per element of a safetensors dtype.
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def weights(model_dir):
    """``(bytes, itemsize)`` of the model's weights as stored, which is what a decode step reads."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    with open(files[0], "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    dtype = next(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return sum(p.stat().st_size for p in files), ITEMSIZE[dtype]


def kv_itemsize(weights_itemsize):
    """Bytes per element of the KV cache the eval fills: float16 where the native kernels run (``kernels``)."""
    from toolcall.model import kernels

    return 2 if kernels.active() else weights_itemsize


def eval_work(model_dir, prompt_tokens, generated, max_tokens, decode_steps):
    """FLOPs and bytes the eval's items need (module doc): lists per item, ``decode_steps`` summed over processes."""
    s = model_shape(model_dir)
    weight_bytes, itemsize = weights(model_dir)
    itemsize = kv_itemsize(itemsize)
    body = s["layers"] * s["block_params"]
    head = s["vocab"] * s["hidden"]
    pair_flops = s["layers"] * 4 * s["heads"] * s["head_dim"]  # q.k and p.v of one (query, key) pair
    kv_bytes = s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * itemsize  # one position's keys and values
    prefill_flops = decode_flops = kv_read = 0
    for p, n in zip(prompt_tokens, generated):
        passes = n + (n < max_tokens)  # the end-of-turn token is sampled too, unless max_tokens cut the output
        seen = passes * p + passes * (passes - 1) // 2  # keys the passes attend to: p, p + 1, ...
        prefill_flops += 2 * body * (p - 1) + pair_flops * (p - 1) * p // 2
        decode_flops += 2 * (body + head) * passes + pair_flops * seen
        kv_read += kv_bytes * seen
    return {"prefill_flops": prefill_flops, "decode_flops": decode_flops, "decode_steps": decode_steps,
            "weight_bytes": weight_bytes, "decode_bytes": decode_steps * weight_bytes + kv_read,
            "kv_bytes_read": kv_read}


def eval_floor(work, gflops, gbps):
    """Seconds: the prefill at ``gflops``, plus the decode at the larger of its FLOPs and its bytes at ``gbps``."""
    prefill = work["prefill_flops"] / (gflops * 1e9)
    decode_compute = work["decode_flops"] / (gflops * 1e9)
    decode_memory = work["decode_bytes"] / (gbps * 1e9)
    return {"seconds": prefill + max(decode_compute, decode_memory), "prefill_s": prefill,
            "decode_compute_s": decode_compute, "decode_memory_s": decode_memory, "gflops": gflops, "gbps": gbps}


def counted_generate(model, tokenizer, prompts, **kwargs):
    """``generation.generate``, each output followed by ``(pid, decode steps)`` of the process that
    generated it: the sharded arm's workers run it (``generate_sharded(generator=)``) so that the floor
    counts the decode steps (batched forward passes) they ran."""
    import os

    from toolcall.evaluate import generation

    steps = _step_counter()
    before = steps["n"]
    out = generation.generate(model, tokenizer, prompts, **kwargs)
    return [(*o, (os.getpid(), steps["n"] - before)) for o in out]


_steps = None


def _step_counter():
    """Counts, from the first call on, every decode step of this process's generation batches (mlx-lm's, greedy's)."""
    global _steps
    if _steps is None:
        from mlx_lm.generate import GenerationBatch

        from toolcall.evaluate.greedy import GreedyGenerationBatch

        _steps = {"n": 0}
        for cls in (GenerationBatch, GreedyGenerationBatch):
            def counted(self, step=cls.__dict__["_step"]):
                _steps["n"] += 1
                return step(self)

            cls._step = counted
    return _steps
