"""Ops section: where one transformer block's time goes at eval shapes (prefill, decode).

    python -m bench.ops [--repeats 3] [--out metrics/bench.json]

Milliseconds per op, ``mx.eval`` after each: the seven projections go through
BLAS (every core), every other op through MLX's own CPU kernels. The block's
shape is the model's (``--model``'s config.json); prefill is one prompt of
400 tokens, decode 32 sequences of one new token over 400 cached.
"""

import sys
import time
from pathlib import Path

if not __package__:  # python bench/ops.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import f, log, median, model_shape, run_worker, section_main


def worker(spec):
    """Milliseconds per op of one transformer block at eval shapes, ``mx.eval`` after each.

    ``prefill``: one prompt of ``L`` tokens; ``decode``: ``B`` sequences, one new
    token each, over a KV cache of ``L``. Shows where generation time goes: the
    seven projections go through BLAS (both cores), every other op through MLX's
    own CPU kernels (one thread).
    """
    import toolcall  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn

    s = spec["shape"]
    d, heads, kv_heads, hd, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"]
    w = {k: mx.random.normal(shape) * 0.02 for k, shape in {
        "q": (d, heads * hd), "k": (d, kv_heads * hd), "v": (d, kv_heads * hd), "o": (heads * hd, d),
        "gate": (d, inter), "up": (d, inter), "down": (inter, d)}.items()}
    norm = mx.ones((d,))
    mx.eval(w, norm)

    def timed(fn):
        mx.eval(fn())
        ts = []
        deadline = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < deadline or len(ts) < 5:
            t = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - t)
        return 1000 * median(ts)

    out = {}
    for name, (b, q_len, kv_len) in {"prefill": (1, s["L"], s["L"]), "decode": (s["B"], 1, s["L"])}.items():
        x = mx.random.normal((b, q_len, d))
        g = mx.random.normal((b, q_len, inter))
        q = mx.random.normal((b, heads, q_len, hd))
        k = mx.random.normal((b, kv_heads, kv_len, hd))
        v = mx.random.normal((b, kv_heads, kv_len, hd))
        mx.eval(x, g, q, k, v)
        mask = "causal" if q_len > 1 else None
        ops = {
            "projections (7 matmuls, BLAS)": lambda: [x @ w["q"], x @ w["k"], x @ w["v"], x @ w["o"],
                                                      x @ w["gate"], x @ w["up"], g @ w["down"]],
            "attention (scaled_dot_product_attention)": lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=hd ** -0.5, mask=mask),
            "swiglu (silu(gate) * up)": lambda: nn.silu(g) * g,
            "2 rms_norm + 2 residual adds": lambda: [mx.fast.rms_norm(x, norm, 1e-5),
                                                     mx.fast.rms_norm(x, norm, 1e-5), x + x, x + x],
            "rope (q and k)": lambda: [mx.fast.rope(q, hd, traditional=False, base=10000.0, scale=1.0, offset=0),
                                       mx.fast.rope(k[:, :, -q_len:], hd, traditional=False, base=10000.0,
                                                    scale=1.0, offset=0)],
        }
        out[name] = {op: timed(fn) for op, fn in ops.items()}
    x = mx.random.normal((s["L"], inter))
    mx.eval(x)
    out["exp_ns_per_element"] = 1e6 * timed(lambda: mx.exp(x)) / x.size
    return out


WORKERS = {"ops": worker}


def add_args(ap):
    pass


def run(args, params):
    """Per-op time of one block at eval shapes (see ``worker``), median over repeats."""
    model = model_shape(args.model)
    shape = {k: model[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")} | {"L": 400, "B": 32}
    runs = [run_worker("ops", "ops", {"shape": shape, "seconds": 1}) for _ in range(args.repeats)]
    out = {"shape": shape, "layers": model["layers"],
           "exp_ns_per_element": median([r["exp_ns_per_element"] for r in runs])}
    for phase in ("prefill", "decode"):
        ms = {op: median([r[phase][op] for r in runs]) for op in runs[0][phase]}
        total = sum(ms.values())
        out[phase] = {op: {"ms": round(v, 3), "share": round(v / total, 3)} for op, v in ms.items()}
    log("ops: " + ", ".join(f"{p} {sum(v['ms'] for v in out[p].values()):.1f} ms/block" for p in ("prefill", "decode")))
    return {"ops": out}


def rows(r):
    if "ops" not in r:
        return []
    o, out = r["ops"], []
    for phase in ("prefill", "decode"):
        shape = (f"1 x {o['shape']['L']} tokens" if phase == "prefill"
                 else f"{o['shape']['B']} x 1 token over {o['shape']['L']} cached")
        out.append((f"one block, {phase} ({shape}): ms per op, share", "", "", "", ""))
        for op, x in o[phase].items():
            out.append((f"  {op}", f(x["ms"], 2), "", "", f"{100 * x['share']:.0f}%"))
    out.append(("  MLX exp on CPU, ns per float32 element", f(o["exp_ns_per_element"], 2), "", "", ""))
    return out


if __name__ == "__main__":
    section_main(sys.modules[__name__])
