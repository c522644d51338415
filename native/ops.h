// The ops the toolcall kernels provide, each an MLX primitive with its
// gradient (vjp). float32 on the CPU; the Python face (toolcall/kernels.py)
// sends anything else to MLX's own ops.
#pragma once

#include <optional>
#include <string>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace tcn {

namespace mx = mlx::core;

// x / sqrt(mean(x^2, -1) + eps) * weight, as mx.fast.rms_norm.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});

// silu(gate) * up, as mlx-lm's swiglu.
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

// Rotary embedding of x (B, heads, T, head_dim) at positions offset + t, as
// mx.fast.rope with traditional=False; offset: an int32 scalar or one per
// batch row (mlx-lm's batched KV cache).
mx::array rope(const mx::array& x, const mx::array& offset, int dims, float base, float scale,
               mx::StreamOrDevice s = {});

// softmax(q k^T * scale + mask) v over (B, heads, Lq, D) queries and
// (B, kv_heads, Lk, D) keys/values (grouped-query attention), as
// mx.fast.scaled_dot_product_attention: mask "" (none), "causal", or "array"
// (a bool or additive float mask broadcastable to (B, heads, Lq, Lk)).
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    const std::string& mask_mode, const std::optional<mx::array>& mask,
                    mx::StreamOrDevice s = {});

// Per-row cross-entropy of logits (..., V) against integer targets (...), as
// mlx.nn.losses.cross_entropy: logsumexp(row) - row[target].
mx::array cross_entropy(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s = {});

}  // namespace tcn
