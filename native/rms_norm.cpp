// RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps), one row per unit.
// Gradient: dx = r * (g * w) - x * r^3 * sum(g * w * x) / d.
#include <cmath>

#include "common.h"
#include "mlx/ops.h"
#include "ops.h"

namespace tcn {

namespace {

constexpr int64_t kRowsPerChunk = 16;

float inv_rms(const float* x, int d, float eps) {
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8) {
    __m256 v = load(x + i, d - i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  return 1.0f / std::sqrt(hsum(acc) / d + eps);
}

class RMSNormVJP : public NativePrimitive {
 public:
  RMSNormVJP(mx::Stream s, float eps) : NativePrimitive(s), eps_(eps) {}
  const char* name() const override { return "ToolcallRMSNormVJP"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    return eps_ == static_cast<const RMSNormVJP&>(o).eps_;
  }

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    allocate(out[0]);
    dispatch(stream(), in, out, [x = in[0], w = in[1], g = in[2], dx = out[0], eps = eps_]() mutable {
      const int d = x.shape(-1);
      const float* xp = x.data<float>();
      const float* wp = w.data<float>();
      const float* gp = g.data<float>();
      float* dp = dx.data<float>();
      parallel_for(x.size() / d, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float *xr = xp + r * d, *gr = gp + r * d;
          float* dr = dp + r * d;
          __m256 ss = _mm256_setzero_ps(), dot = _mm256_setzero_ps();
          for (int i = 0; i < d; i += 8) {
            __m256 xv = load(xr + i, d - i);
            ss = _mm256_fmadd_ps(xv, xv, ss);
            dot = _mm256_fmadd_ps(_mm256_mul_ps(load(gr + i, d - i), load(wp + i, d - i)), xv, dot);
          }
          float inv = 1.0f / std::sqrt(hsum(ss) / d + eps);
          __m256 rv = _mm256_set1_ps(inv);
          __m256 cv = _mm256_set1_ps(inv * inv * inv * hsum(dot) / d);
          for (int i = 0; i < d; i += 8) {
            __m256 gw = _mm256_mul_ps(load(gr + i, d - i), load(wp + i, d - i));
            store(dr + i, _mm256_fnmadd_ps(load(xr + i, d - i), cv, _mm256_mul_ps(rv, gw)), d - i);
          }
        }
      });
    });
  }

 private:
  float eps_;
};

class RMSNorm : public NativePrimitive {
 public:
  RMSNorm(mx::Stream s, float eps) : NativePrimitive(s), eps_(eps) {}
  const char* name() const override { return "ToolcallRMSNorm"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    return eps_ == static_cast<const RMSNorm&>(o).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    allocate(out[0]);
    dispatch(stream(), in, out, [x = in[0], w = in[1], y = out[0], eps = eps_]() mutable {
      const int d = x.shape(-1);
      const float* xp = x.data<float>();
      const float* wp = w.data<float>();
      float* yp = y.data<float>();
      parallel_for(x.size() / d, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* xr = xp + r * d;
          __m256 rv = _mm256_set1_ps(inv_rms(xr, d, eps));
          // (x * r) * w: MLX's order of the two products.
          for (int i = 0; i < d; i += 8) {
            __m256 v = _mm256_mul_ps(load(xr + i, d - i), rv);
            store(yp + r * d + i, _mm256_mul_ps(v, load(wp + i, d - i)), d - i);
          }
        }
      });
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    const auto &x = primals[0], &w = primals[1];
    auto g = mx::contiguous(cot[0], false, s);
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        grads.push_back(mx::array(x.shape(), mx::float32, std::make_shared<RMSNormVJP>(s, eps_), {x, w, g}));
      } else {
        // The weight's gradient (frozen under LoRA, so rarely asked for): MLX ops.
        auto normed = mx::multiply(
            x, mx::rsqrt(mx::add(mx::mean(mx::square(x, s), -1, true, s), mx::array(eps_), s), s), s);
        auto axes = std::vector<int>(x.ndim() - 1);
        for (int i = 0; i < static_cast<int>(x.ndim()) - 1; ++i) axes[i] = i;
        grads.push_back(mx::sum(mx::multiply(g, normed, s), axes, false, s));
      }
    }
    return grads;
  }

 private:
  float eps_;
};

}  // namespace

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  check_float32(x, "rms_norm", "x");
  check_float32(weight, "rms_norm", "weight");
  if (x.ndim() < 1 || weight.ndim() != 1 || static_cast<int64_t>(weight.size()) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: weight must be 1-D with x's last dimension");
  }
  auto st = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(st, eps),
                   {mx::contiguous(x, false, st), mx::contiguous(weight, false, st)});
}

}  // namespace tcn
