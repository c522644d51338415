// SwiGLU: y = silu(gate) * up = (gate * sigmoid(gate)) * up, element-wise,
// with MLX's sigmoid and the same products in the same order (bit-identical
// to MLX). Gradient: d_up = g * silu(gate),
// d_gate = g * up * s * (1 + gate * (1 - s)), s = sigmoid(gate).
#include "common.h"
#include "mlx/ops.h"
#include "ops.h"

namespace tcn {

namespace {

constexpr int64_t kChunk = 4096;  // elements per unit of work
constexpr int64_t kChunksPerThread = 8;

// f(offset, n) over [0, size) in chunks of kChunk elements.
template <class F>
void over_chunks(int64_t size, F&& f) {
  parallel_for((size + kChunk - 1) / kChunk, kChunksPerThread, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t begin = c * kChunk, end = std::min(size, begin + kChunk);
      for (int64_t i = begin; i < end; i += 8) f(i, static_cast<int>(end - i));
    }
  });
}

class SwiGLUVJP : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "ToolcallSwiGLUVJP"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    allocate(out[0]);
    allocate(out[1]);
    dispatch(stream(), in, out, [gate = in[0], up = in[1], g = in[2], dgate = out[0], dup = out[1]]() mutable {
      const float *a = gate.data<float>(), *b = up.data<float>(), *gp = g.data<float>();
      float *da = dgate.data<float>(), *db = dup.data<float>();
      const __m256 one = _mm256_set1_ps(1.0f);
      over_chunks(gate.size(), [&](int64_t i, int n) {
        __m256 x = load(a + i, n), u = load(b + i, n), gv = load(gp + i, n);
        __m256 s = sigmoid8(x);
        store(db + i, _mm256_mul_ps(gv, _mm256_mul_ps(x, s)), n);
        __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
        store(da + i, _mm256_mul_ps(_mm256_mul_ps(gv, u), dsilu), n);
      });
    });
  }
};

class SwiGLU : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "ToolcallSwiGLU"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    allocate(out[0]);
    dispatch(stream(), in, out, [gate = in[0], up = in[1], y = out[0]]() mutable {
      const float *a = gate.data<float>(), *b = up.data<float>();
      float* yp = y.data<float>();
      over_chunks(gate.size(), [&](int64_t i, int n) {
        __m256 x = load(a + i, n);
        store(yp + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid8(x)), load(b + i, n)), n);
      });
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    auto g = mx::contiguous(cot[0], false, s);
    auto shape = primals[0].shape();
    auto both = mx::array::make_arrays({shape, shape}, {mx::float32, mx::float32},
                                       std::make_shared<SwiGLUVJP>(s), {primals[0], primals[1], g});
    std::vector<mx::array> grads;
    for (int arg : argnums) grads.push_back(both[arg]);
    return grads;
  }
};

}  // namespace

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  check_float32(gate, "swiglu", "gate");
  check_float32(up, "swiglu", "up");
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument("swiglu: gate and up must have the same shape");
  }
  auto st = mx::to_stream(s);
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(st),
                   {mx::contiguous(gate, false, st), mx::contiguous(up, false, st)});
}

}  // namespace tcn
