"""Native CPU kernels for a model's hot ops: RMSNorm, SwiGLU, RoPE, attention, the loss's cross-entropy.

MLX's Linux CPU backend runs these ops on one thread and without SIMD (the
wheel targets baseline x86-64; ``make bench``, ops section): in training,
attention's softmax alone costs more than all the matmuls. ``native/`` holds
them as MLX custom primitives in C++ (AVX2/FMA/F16C, one thread per usable core,
with the gradients LoRA training backpropagates through). ``install(model)``
routes a loaded mlx-lm llama model's modules through them, on Linux x86-64
CPUs with AVX2, FMA and F16C, when MLX's default device is the CPU, for float32
only; everywhere else the model runs MLX's own ops unchanged. A KV cache
holds float16 keys and values (as llama.cpp's default cache does): a decode
step reads the cache of every sequence in the batch, on long prompts several
times the weights' bytes, and the attention kernel widens them to float32 as
it reads. ``kv_cache_dtype(mx.float32)`` keeps them float32 where a cached
forward must equal an uncached one (log-probs of sampled tokens, which the
training step recomputes without a cache). ``loss`` takes
its cross-entropy from ``cross_entropy`` here, on the same terms.
``TOOLCALL_NATIVE=0`` turns them off (the reference path).

What holds (``tests/test_kernels.py``): each op's value and gradient equal
MLX's within 1e-5 relative (RoPE and SwiGLU bit for bit); results are the same
bytes on every run and for any thread count (work is split into units computed
the same way whichever thread runs them).

The extension is built once per (sources, mlx, nanobind, Python) into
``$XDG_CACHE_HOME/toolcall/native/<key>/`` (default ``~/.cache``): by ``make
env`` (``python -m toolcall.model.kernels``), else at first use. A Linux x86-64
machine that cannot build it (no compiler, cmake or nanobind) or lacks
AVX2/FMA/F16C gets one warning line and MLX's ops.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu as mlx_swiglu

from toolcall.errors import WriteError
from toolcall.io import atomic_dir
from toolcall.model import blas

ENV = "TOOLCALL_NATIVE"
SOURCES = Path(__file__).resolve().parents[2] / "native"
MODULE = "_toolcall_native"

_ext = None  # the loaded extension
_tried = False  # load() ran (it warns at most once per process)


class BuildError(RuntimeError):
    """The extension could not be built here; the message says why."""


def enabled_here():
    """Whether this process may use the kernels at all: the switch, the OS, the CPU (not the build)."""
    return os.environ.get(ENV, "1") != "0" and sys.platform == "linux" and platform.machine() == "x86_64"


def _cpu_has_avx2_fma_f16c():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma", "f16c"} <= flags
    except OSError:
        pass
    return False


def _key():
    """Changes with anything the built module depends on: sources, mlx (and where it lives), nanobind, Python."""
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        import nanobind

        nb_version = nanobind.__version__
    except ImportError:
        nb_version = "none"
    h.update(f"{mx.__version__} {Path(mx.__file__).parent} {nb_version} {sys.version}".encode())
    return h.hexdigest()[:16]


def cache_dir():
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "toolcall" / "native" / _key()


def _built(where):
    return next(where.glob(f"{MODULE}*.so"), None) if where.is_dir() else None


def build():
    """Build the extension into ``cache_dir()`` (no-op when it is there); return the module's path.

    Concurrent processes take turns on a lock file; the directory appears
    whole or not at all. Raises ``BuildError`` (the log's tail in it).
    """
    out = cache_dir()
    if found := _built(out):
        return found
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if found := _built(out):  # another process built it while we waited
            return found
        cmake = shutil.which("cmake", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if cmake is None:
            raise BuildError("no cmake (pip install cmake, or the system's)")
        if shutil.which("c++") is None and shutil.which("g++") is None:
            raise BuildError("no C++ compiler (g++ >= 12 or clang)")
        with atomic_dir(out) as tmp:
            work = tmp / "build"
            log = tmp / "build.log"
            steps = [
                [cmake, "-S", str(SOURCES), "-B", str(work), f"-DPython_EXECUTABLE={sys.executable}"],
                [cmake, "--build", str(work), "-j", str(len(os.sched_getaffinity(0)))],
            ]
            with open(log, "w") as f:
                for cmd in steps:
                    if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                        tail = log.read_text().strip().splitlines()[-3:]
                        raise BuildError(f"{' '.join(cmd[:2])} failed: {' | '.join(tail)}")
            shutil.copy2(_built(work), tmp)
            shutil.rmtree(work)
        return _built(out)


def load():
    """The extension module, built if needed, or None where the kernels are off or cannot run."""
    global _ext, _tried
    if _ext is not None or _tried:
        return _ext
    _tried = True
    if not enabled_here():
        return None
    if not _cpu_has_avx2_fma_f16c():
        _warn("this CPU lacks AVX2/FMA/F16C")
        return None
    try:
        path = build()
    except (BuildError, OSError, WriteError) as e:  # WriteError: the cache directory is not writable
        _warn(f"cannot build them ({e})")
        return None
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _ext = module
    return _ext


def _warn(why):
    print(f"warning: toolcall's native CPU kernels are off, {why}: using MLX's own ops (slower)", file=sys.stderr)


def active():
    """Whether ``install`` would route a model through the kernels now."""
    return enabled_here() and mx.default_device() == mx.cpu and load() is not None


def set_threads(n):
    """Threads the kernels use from now on; returns the previous count (None when they are off).

    Results do not depend on it. ``blas.threads`` calls it, so work that runs
    one lane per core (sharded eval) limits both thread pools.
    """
    if _ext is None:
        return None
    before = _ext.threads()
    _ext.set_threads(n)
    return before


blas.thread_setters.append(set_threads)


# ---------------------------------------------------------------- the ops


def rms_norm(x, weight, eps):
    return _ext.rms_norm(x, weight, eps)


def swiglu(gate, up):
    return _ext.swiglu(gate, up)


def rope(x, offset, dims, base, scale):
    """``mx.fast.rope(x, dims, traditional=False, base=, scale=, offset=)``; offset: int or int array."""
    offset = offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)
    return _ext.rope(x, offset, dims, base, scale)


def cross_entropy(logits, targets):
    """Per-position cross-entropy, ``mlx.nn.losses.cross_entropy(logits, targets)``: the kernel where active.

    The one op here called outside a model's modules (``loss``), so it picks
    its path itself.
    """
    if logits.dtype == mx.float32 and active():
        return _ext.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits, targets)


def attention(q, k, v, scale, mask=None):
    """``mx.fast.scaled_dot_product_attention(q, k, v, scale=, mask=)``: mask None, "causal" or an array."""
    if mask is None:
        return _ext.attention(q, k, v, scale, "")
    if isinstance(mask, str):
        return _ext.attention(q, k, v, scale, mask)
    return _ext.attention(q, k, v, scale, "array", mask)


# ---------------------------------------------------------------- the model


class _RMSNorm(nn.RMSNorm):
    def __call__(self, x):
        if x.dtype == mx.float32 and self.weight.dtype == mx.float32:
            return rms_norm(x, self["weight"], self.eps)
        return super().__call__(x)


class _MLP(llama.MLP):
    def __call__(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        act = swiglu(gate, up) if gate.dtype == mx.float32 and up.dtype == mx.float32 else mlx_swiglu(gate, up)
        return self.down_proj(act)


_kv_dtype = mx.float16  # what a KV cache holds on the native path (module docstring)


@contextlib.contextmanager
def kv_cache_dtype(dtype):
    """KV caches filled inside the block hold ``dtype`` (mx.float32: the values of a forward without a cache)."""
    global _kv_dtype
    before, _kv_dtype = _kv_dtype, dtype
    try:
        yield
    finally:
        _kv_dtype = before


class _Attention(llama.Attention):
    """mlx-lm's llama attention step for step, with the native RoPE and attention."""

    def __call__(self, x, mask=None, cache=None):
        if x.dtype != mx.float32 or hasattr(cache, "bits"):  # a quantized KV cache: mlx-lm's own path
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        r = self.rope
        queries = rope(queries, offset, r.dims, r.base, r.scale)
        keys = rope(keys, offset, r.dims, r.base, r.scale)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys.astype(_kv_dtype), values.astype(_kv_dtype))
        out = attention(queries, keys, values, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _native_class(module):
    """The native twin of an mlx-lm module's class, or None where the kernels do not cover it."""
    kind = type(module)
    if kind is nn.RMSNorm:
        return _RMSNorm
    if kind is llama.MLP:
        return _MLP
    if (kind is llama.Attention and type(module.rope) is nn.RoPE and not module.rope.traditional
            and module.head_dim <= 128):
        return _Attention
    return None


def install(model):
    """Route ``model``'s RMSNorm, SwiGLU MLP and attention (RoPE too) through the kernels; returns how many modules.

    Swaps each covered module's class for a subclass whose ``__call__`` uses
    the kernels: weights, parameter tree and adapters stay exactly as they
    were. 0 (the model untouched) where the kernels are off or do not apply.
    """
    if not active():
        return 0
    n = 0
    for module in model.modules():
        if native := _native_class(module):
            module.__class__ = native
            n += 1
    return n


if __name__ == "__main__":  # make env: build now, so that the first stage does not wait
    if not enabled_here():
        sys.exit(0)
    if load() is not None:
        print(f"native CPU kernels: {build()}")
