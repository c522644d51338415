"""The native CPU kernels (toolcall/model/kernels.py, native/) against MLX's own ops.

Each op's value and gradient within 1e-5 relative (max abs difference over
the largest reference value) of MLX's, on SmolLM2-135M's shapes (hidden 576,
9 heads, 3 kv heads, head_dim 64, intermediate 1536) and on odd sizes whose
rows are not a multiple of 8; the same bytes on every call and for any thread
count; a tiny model's greedy outputs unchanged; and the reference path
(TOOLCALL_NATIVE=0) and the one-line warning where the kernels cannot be built.
On this Linux x86-64 machine the extension is built if missing (about a
minute): a build failure fails these tests, it does not skip them.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from tiny_model import make_tiny_model

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from toolcall.evaluate.generation import generate
from toolcall.model import kernels, lora

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def ext():
    if not kernels.enabled_here():
        pytest.skip(f"the kernels are for Linux x86-64 and on ({kernels.ENV}={os.environ.get(kernels.ENV)})")
    if not kernels._cpu_has_avx2_fma_f16c():
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    kernels.build()  # raises BuildError with the build log's tail
    assert kernels.load() is not None
    before = kernels.set_threads(2)  # two threads even on one core: the split is what is tested
    yield
    kernels.set_threads(before)


def rel(a, b):
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def close(ours, ref):
    ours, ref = (ours, ref) if isinstance(ours, (list, tuple)) else ([ours], [ref])
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) <= TOL, rel(a, b)


def grads(f, args, cotangent_shape, seed=7):
    """d/d(args) of sum(f(*args) * c) for a fixed random c."""
    c = mx.random.normal(cotangent_shape, key=mx.random.key(seed))
    out = mx.grad(lambda *a: (f(*a) * c).sum(), argnums=tuple(range(len(args))))(*args)
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def randn(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


@pytest.mark.parametrize("shape", [(2, 7, 576), (3, 5, 37), (1, 13)])
def test_rms_norm(shape):
    x, w = randn(*shape), randn(shape[-1], seed=1)
    close(kernels.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))
    close(grads(lambda x, w: kernels.rms_norm(x, w, 1e-5), (x, w), shape),
          grads(lambda x, w: mx.fast.rms_norm(x, w, 1e-5), (x, w), shape))


@pytest.mark.parametrize("shape", [(2, 7, 1536), (3, 13), (5,)])
def test_swiglu_is_mlx_bit_for_bit(shape):
    g, u = randn(*shape) * 4, randn(*shape, seed=1)
    assert mx.array_equal(kernels.swiglu(g, u), nn.silu(g) * u).item()
    close(grads(kernels.swiglu, (g, u), shape), grads(lambda g, u: nn.silu(g) * u, (g, u), shape))


@pytest.mark.parametrize("offset", [0, 37, 9000, [3, -2]])  # 9000: past the angle table; -2: left padding
def test_rope_is_mlx_bit_for_bit(offset):
    x = randn(2, 7, 9, 64).transpose(0, 2, 1, 3)  # (B, heads, L, head_dim), a strided view as in attention
    off = mx.array(offset) if isinstance(offset, list) else offset

    def ref(x):
        return mx.fast.rope(x, 64, traditional=False, base=100000.0, scale=1.0, offset=off)

    def ours(x):
        return kernels.rope(x, off, 64, 100000.0, 1.0)

    assert mx.array_equal(ours(x), ref(x)).item()
    close(grads(ours, (x,), x.shape), grads(ref, (x,), x.shape))


def test_rope_and_attention_read_any_strides():
    # The last axis itself strided (a transposed view): the kernels read a packed copy.
    x = randn(2, 9, 64, 7).swapaxes(-1, -2)
    ref = mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=3)
    assert mx.array_equal(kernels.rope(x, 3, 64, 10000.0, 1.0), ref).item()
    q, k, v = (randn(2, h, 64, 11, seed=s).swapaxes(-1, -2) for h, s in ((9, 1), (3, 2), (3, 3)))
    close(kernels.attention(q, k, v, 0.125, "causal"),
          mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal"))


def test_rope_partial_dims_and_scale():
    x = randn(1, 3, 5, 24)  # rotates the first 20 dims (half = 10, not a multiple of 8), passes 4 through
    ref = mx.fast.rope(x, 20, traditional=False, base=10000.0, scale=0.5, offset=4)
    assert mx.array_equal(kernels.rope(x, 4, 20, 10000.0, 0.5), ref).item()


def attention_inputs(B, H, Hk, Lq, Lk, D, seed=0):
    q = randn(B, Lq, H, D, seed=seed).transpose(0, 2, 1, 3)
    k = randn(B, Hk, Lk + 3, D, seed=seed + 1)[:, :, :Lk]  # a slice of a longer buffer, as a KV cache gives
    v = randn(B, Hk, Lk, D, seed=seed + 2)
    return q, k, v


ATTENTION_CASES = {
    # name: (B, H, Hk, Lq, Lk, D, mask)
    "prefill_causal": (2, 9, 3, 37, 37, 64, "causal"),
    "decode_over_cache": (3, 9, 3, 1, 45, 64, None),
    "odd_head_dim": (2, 4, 2, 11, 11, 20, "causal"),
    "causal_with_cached_prefix": (1, 9, 3, 5, 12, 64, "causal"),
    "bool_mask_left_padding": (3, 9, 3, 6, 6, 64, "bool"),
    "decode_bool_mask": (3, 9, 3, 1, 45, 64, "bool"),
    "prefill_bool_mask_over_a_cache": (3, 9, 3, 7, 19, 64, "bool"),
    "additive_mask": (2, 4, 4, 9, 9, 16, "additive"),
}


def make_mask(kind, B, Lq, Lk):
    if kind in (None, "causal"):
        return kind
    # mlx-lm's batched cache: row b is left-padded by b tokens and sees keys from there on, causally.
    pad = mx.arange(B)[:, None, None, None]
    q_pos = mx.arange(Lk - Lq, Lk)[None, None, :, None]
    k_pos = mx.arange(Lk)[None, None, None, :]
    keep = (k_pos >= pad) & (k_pos <= q_pos)  # row 0 of a padded sequence sees no key: a fully masked row
    return keep if kind == "bool" else mx.where(keep, 0.0, -1e9) + 0.1 * randn(B, 1, Lq, Lk, seed=5)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(case):
    B, H, Hk, Lq, Lk, D, kind = ATTENTION_CASES[case]
    q, k, v = attention_inputs(B, H, Hk, Lq, Lk, D)
    mask = make_mask(kind, B, Lq, Lk)
    scale = D ** -0.5

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def ours(q, k, v):
        return kernels.attention(q, k, v, scale, mask)

    close(ours(q, k, v), ref(q, k, v))
    close(grads(ours, (q, k, v), q.shape), grads(ref, (q, k, v), q.shape))


def test_a_causal_bool_mask_gives_the_causal_mode_s_bits():
    """mlx-lm's batched prefill passes its causal mask as a bool array: the kernel stops each row at its last
    visible key as the causal mode does, and every bit of the output and gradients is the causal mode's."""
    B, H, Hk, Lq, Lk, D = 2, 9, 3, 29, 40, 64  # 11 cached keys before the 29 new rows
    q, k, v = attention_inputs(B, H, Hk, Lq, Lk, D)
    causal = mx.arange(Lk - Lq, Lk)[:, None] >= mx.arange(Lk)[None]
    mask = mx.broadcast_to(causal[None, None], (B, 1, Lq, Lk))
    scale = D ** -0.5
    as_mode, as_array = (lambda q, k, v: kernels.attention(q, k, v, scale, "causal"),
                         lambda q, k, v: kernels.attention(q, k, v, scale, mask))
    assert mx.array_equal(as_array(q, k, v), as_mode(q, k, v)).item()
    for a, b in zip(grads(as_array, (q, k, v), q.shape), grads(as_mode, (q, k, v), q.shape)):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("shape", [(2, 5, 49152), (7, 1001)])  # SmolLM2's vocabulary; an odd one
def test_cross_entropy(shape):
    logits = randn(*shape) * 3
    targets = mx.random.randint(0, shape[-1], shape[:-1], key=mx.random.key(2))

    def ours(x):
        return kernels.cross_entropy(x, targets)

    def ref(x):  # in float64: over 49k classes MLX's float32 logsumexp is itself ~6e-5 off (ours ~4e-6)
        return nn.losses.cross_entropy(x.astype(mx.float64), targets).astype(mx.float32)

    assert kernels.active()  # the native kernel, not its fallback
    with mx.stream(mx.cpu):
        close(ours(logits), ref(logits))
        close(grads(ours, (logits,), shape[:-1]), [g.astype(mx.float32) for g in grads(ref, (logits,), shape[:-1])])


def test_same_bytes_every_call_and_any_thread_count():
    q, k, v = attention_inputs(2, 9, 3, 41, 41, 64)
    x, w = randn(2, 41, 576), randn(576, seed=1)

    def run():
        out = [kernels.attention(q, k, v, 0.125, "causal"), kernels.rms_norm(x, w, 1e-5)]
        out += grads(lambda q, k, v: kernels.attention(q, k, v, 0.125, "causal"), (q, k, v), q.shape)
        out += grads(lambda x: kernels.rms_norm(x, w, 1e-5), (x,), x.shape)
        mx.eval(out)
        return [bytes(memoryview(a)) for a in out]

    first = run()
    assert run() == first
    before = kernels.set_threads(1)
    try:
        assert run() == first
    finally:
        kernels.set_threads(before)


PROMPTS = ["What is the weather in Paris?", "Call the function", "The capital of France is Paris."]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_float16_keys_and_values_give_the_float32_kernel_s_bits_on_the_same_values(case):
    """A KV cache in float16: the kernel widens each key and value exactly, so its output is, bit for bit,
    the float32 kernel's on those values; no gradient flows through a float16 cache."""
    B, H, Hk, Lq, Lk, D, kind = ATTENTION_CASES[case]
    q, k, v = attention_inputs(B, H, Hk, Lq, Lk, D)
    mask = make_mask(kind, B, Lq, Lk)
    k16, v16 = k.astype(mx.float16), v.astype(mx.float16)
    half = kernels.attention(q, k16, v16, D ** -0.5, mask)
    assert half.dtype == mx.float32
    assert mx.array_equal(half, kernels.attention(q, k16.astype(mx.float32), v16.astype(mx.float32), D ** -0.5,
                                                  mask)).item()
    with pytest.raises(ValueError, match="gradients need float32 keys and values"):
        mx.grad(lambda q: kernels.attention(q, k16, v16, D ** -0.5, mask).sum())(q)
    with pytest.raises(ValueError, match="k and v must both be float32 or both float16"):
        kernels.attention(q, k16, v, D ** -0.5, mask)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_greedy_outputs_and_loss_unchanged(tiny):
    from mlx_lm import load

    from toolcall.train import loss
    from toolcall.train.batches import collate

    native, tokenizer = lora.load_model(tiny)
    reference, _ = load(str(tiny))
    assert type(native.layers[0].self_attn) is kernels._Attention  # the native path is what runs
    assert type(reference.layers[0].self_attn) is not kernels._Attention
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    assert (generate(native, tokenizer, prompts, max_tokens=24, batch_size=3)
            == generate(reference, tokenizer, prompts, max_tokens=24, batch_size=3))
    batch = collate([(p + p[::-1], len(p)) for p in prompts])
    values = [nn.value_and_grad(m, loss.completion_loss)(m, *batch) for m in (native, reference)]
    (ours, _), g_ours = values[0]
    (ref, _), g_ref = values[1]
    assert abs(ours.item() - ref.item()) <= TOL * abs(ref.item())
    from mlx.utils import tree_flatten

    for (name, a), (_, b) in zip(tree_flatten(g_ours), tree_flatten(g_ref)):
        assert rel(a, b) <= 1e-4, name  # through two blocks and the tied head


def run_python(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


LOAD_AND_GENERATE = """
    import toolcall
    from toolcall.evaluate.generation import generate
    from toolcall.model import kernels, lora
    model, tok = lora.load_model({tiny!r})
    print(type(model.layers[0].self_attn).__name__, kernels.install(model))
    generate(model, tok, [tok.encode("Paris")], max_tokens=4, batch_size=1)
    print("generated")
"""


def test_reference_path_when_switched_off(tiny):
    env = {**os.environ, kernels.ENV: "0"}
    proc = run_python(LOAD_AND_GENERATE.format(tiny=str(tiny)), env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Attention", "0", "generated"]  # mlx-lm's own class, nothing swapped, generates
    assert "warning" not in proc.stderr


def test_one_warning_line_and_mlx_ops_without_a_compiler(tiny, tmp_path):
    # A fresh cache (nothing built) and a PATH with no compiler: the build cannot run.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PATH": str(tmp_path / "nothing"),
           kernels.ENV: "1"}
    proc = run_python(LOAD_AND_GENERATE.format(tiny=str(tiny)), env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Attention", "0", "generated"]
    warnings = [line for line in proc.stderr.splitlines() if "native CPU kernels" in line]
    assert len(warnings) == 1, proc.stderr
    assert "no C++ compiler" in warnings[0] or "no cmake" in warnings[0]
