"""Resumable training: the state of a run, saved every few steps beside the stage's output.

A checkpoint is ``<out_dir>.checkpoint/``: the LoRA weights, the optimizer
state (Adam moments, step count, so the learning-rate schedule continues),
MLX's RNG key, the step, the logged history and what else the loop keeps
(the selection's evaluations and the weights of its best so far). It is
written whole or not at all (``io.atomic_dir``), so a run killed at any
moment leaves the previous checkpoint intact. It carries a fingerprint of everything the run depends on
(config, training data, base weights); a rerun of the same stage with the
same inputs resumes from it and ends with the same bytes as an uninterrupted
run, a rerun with other inputs ignores it. The stage deletes it once its
outputs are written, and DVC never sees it (``.gitignore``, ``.dvcignore``).
Under data-parallel ranks every rank holds the same state and rank 0 alone
writes it; every rank reads it back on resume.
"""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from toolcall.io import atomic_dir, set_aside, write_json
from toolcall.train import launch

META = "meta.json"
WEIGHTS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
TENSORS = "tensors.safetensors"


def fingerprint(*parts):
    """A digest of JSON-serializable ``parts`` (configs, data digests)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def examples_digest(examples):
    """A digest of ``(tokens, prompt_len)`` training examples (and their token weights where they carry them)."""
    h = hashlib.sha256()
    for tokens, prompt_len, *weights in examples:
        h.update(json.dumps([prompt_len, list(tokens), *weights]).encode())
    return h.hexdigest()


def files_digest(directory, pattern="*.safetensors"):
    """A digest of the files matching ``pattern`` in ``directory`` (model or adapter weights)."""
    h = hashlib.sha256()
    for path in sorted(Path(directory).glob(pattern)):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def continuation_key(stage, cfg, model_dir, sft_dir, *data_files, settings=None):
    """The fingerprint of a stage that continues the SFT adapter on data files (DPO, RL).

    ``settings``: JSON of what else the run depends on (the selection's decoding, ``ValidationSet.settings``).
    """
    return fingerprint(stage, dataclasses.asdict(cfg), files_digest(model_dir), files_digest(sft_dir),
                       *(files_digest(Path(f).parent, Path(f).name) for f in data_files), settings)


class Checkpoint:
    """Save and resume one training run; ``every`` steps between saves (0: never)."""

    def __init__(self, out_dir, key, every):
        self.dir = Path(str(Path(out_dir)) + ".checkpoint")
        self.key, self.every = key, every

    def due(self, step):
        return self.every > 0 and step % self.every == 0

    def save(self, step, model, optimizer, history, extra=None, tensors=None):
        """Write the run's state after ``step`` steps, replacing the previous checkpoint whole (rank 0).

        ``extra``: JSON the loop needs back; ``tensors``: named arrays it needs back.
        """
        if not launch.is_main():
            return
        with atomic_dir(self.dir) as tmp:
            mx.save_safetensors(str(tmp / WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
            if optimizer is not None:
                mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
            if tensors:
                mx.save_safetensors(str(tmp / TENSORS), tensors)
            write_json(tmp / META, {"key": self.key, "step": step, "rng": mx.random.state[0].tolist(),
                                    "history": history, "extra": extra})

    def location(self):
        """Where the checkpoint is: ``dir``; or, when a kill hit while a save swapped the new one in on
        a system without an atomic exchange (``io.atomic_dir`` then moves the old aside first), the
        previous one, left as ``.<name>.*.old``."""
        if (self.dir / META).exists():
            return self.dir
        return next((p for p in reversed(set_aside(self.dir)) if (p / META).exists()), self.dir)

    def resume(self, model, optimizer):
        """Load a matching checkpoint into ``model`` and ``optimizer``; return its meta, or None.

        The meta's ``tensors`` holds the saved ``tensors`` (empty if none).
        """
        where = self.location()
        try:
            with open(where / META) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        if meta.get("key") != self.key:
            print(f"{self.dir}: made with other inputs; starting over", flush=True)
            return None
        model.update(tree_unflatten(list(mx.load(str(where / WEIGHTS)).items())))
        if optimizer is not None:
            optimizer.state = tree_unflatten(list(mx.load(str(where / OPTIMIZER)).items()))
        # MLX's key for seed s is [s >> 32, s & 0xffffffff], so reseeding with the
        # saved key's two words restores it exactly (the state cannot be assigned).
        meta["tensors"] = mx.load(str(where / TENSORS)) if (where / TENSORS).exists() else {}
        hi, lo = meta["rng"]
        mx.random.seed((hi << 32) | lo)
        print(f"{where}: resuming after step {meta['step']}", flush=True)
        return meta

    def clear(self):
        if launch.is_main():
            for path in [self.dir, *set_aside(self.dir)]:
                shutil.rmtree(path, ignore_errors=True)
