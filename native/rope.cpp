// Rotary position embedding, mx.fast.rope's traditional=False layout: the
// first and second halves of the rotated dims form the pairs. The angles are
// computed with MLX's own exp/sin/cos code (its CPU simd headers) by MLX's
// formula, and each output is the same two products and one sum as MLX's
// fallback: bit-identical to mx.fast.rope. Angles of positions [0, kTable)
// are computed once per (dims, base, scale) and shared by every call.
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "common.h"
#include "mlx/backend/cpu/simd/math.h"
#include "mlx/ops.h"
#include "ops.h"

namespace tcn {

namespace {

namespace simd = mlx::core::simd;

constexpr int64_t kTable = 8192;
constexpr int64_t kPositionsPerChunk = 4;

// cos and sin of one position's angles, as MLX's fallback computes them:
// theta_i = ((float(p) * scale) * exp(-i * (log(base) / half))).
class Angles {
 public:
  Angles(int dims, float base, float scale) : half_(dims / 2), scale_(scale), inv_freq_(half_) {
    const float step = std::log(base) / half_;
    for (int i = 0; i < half_; ++i) {
      inv_freq_[i] = simd::exp(simd::Simd<float, 1>(-static_cast<float>(i) * step)).value;
    }
    table_.resize(kTable * 2 * half_);
    for (int64_t p = 0; p < kTable; ++p) compute(p, table_.data() + p * 2 * half_);
  }

  // Pointer to [cos_0 .. cos_{half-1}, sin_0 .. sin_{half-1}] of position p;
  // `scratch` (2 * half floats) holds it when p is outside the table.
  const float* at(int64_t p, float* scratch) const {
    if (p >= 0 && p < kTable) return table_.data() + p * 2 * half_;
    compute(p, scratch);
    return scratch;
  }

  int half() const { return half_; }

 private:
  void compute(int64_t p, float* out) const {
    const float pos = static_cast<float>(p) * scale_;
    for (int i = 0; i < half_; ++i) {
      simd::Simd<float, 1> theta(pos * inv_freq_[i]);
      out[i] = simd::cos(theta).value;
      out[half_ + i] = simd::sin(theta).value;
    }
  }

  int half_;
  float scale_;
  std::vector<float> inv_freq_, table_;
};

std::shared_ptr<const Angles> angles_for(int dims, float base, float scale) {
  static std::mutex m;
  static std::map<std::tuple<int, float, float>, std::shared_ptr<const Angles>> cache;
  std::lock_guard<std::mutex> lock(m);
  auto& a = cache[{dims, base, scale}];
  if (!a) a = std::make_shared<const Angles>(dims, base, scale);
  return a;
}

class RoPE : public NativePrimitive {
 public:
  RoPE(mx::Stream s, int dims, float base, float scale, bool forward)
      : NativePrimitive(s), dims_(dims), base_(base), scale_(scale), forward_(forward),
        angles_(angles_for(dims, base, scale)) {}
  const char* name() const override { return "ToolcallRoPE"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& r = static_cast<const RoPE&>(o);
    return dims_ == r.dims_ && base_ == r.base_ && scale_ == r.scale_ && forward_ == r.forward_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    allocate(out[0]);
    dispatch(stream(), in, out,
             [x = in[0], off = in[1], y = out[0], angles = angles_, forward = forward_, dims = dims_]() mutable {
               const int64_t B = x.shape(0), N = x.shape(1), T = x.shape(2), D = x.shape(3);
               const int half = angles->half();
               const Rows4 rows(x);
               const int32_t* offsets = off.data<int32_t>();
               const bool per_row = off.size() > 1;
               float* yp = y.data<float>();
               parallel_for(B * T, kPositionsPerChunk, [&](int64_t u0, int64_t u1) {
                 std::vector<float> scratch(2 * half);
                 for (int64_t u = u0; u < u1; ++u) {
                   const int64_t b = u / T, t = u % T;
                   const float* cs = angles->at(offsets[per_row ? b : 0] + t, scratch.data());
                   for (int64_t n = 0; n < N; ++n) {
                     const float* xr = rows.row(b, n, t);
                     float* yr = yp + ((b * N + n) * T + t) * D;
                     for (int i = 0; i < half; i += 8) {
                       const int m = half - i;
                       __m256 x1 = load(xr + i, m), x2 = load(xr + half + i, m);
                       __m256 c = load(cs + i, m), s = load(cs + half + i, m);
                       __m256 a, bb;
                       if (forward) {  // x1 c - x2 s, x1 s + x2 c
                         a = _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s));
                         bb = _mm256_add_ps(_mm256_mul_ps(x1, s), _mm256_mul_ps(x2, c));
                       } else {  // the inverse rotation: x2 s + x1 c, x2 c - x1 s
                         a = _mm256_add_ps(_mm256_mul_ps(x2, s), _mm256_mul_ps(x1, c));
                         bb = _mm256_sub_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s));
                       }
                       store(yr + i, a, m);
                       store(yr + half + i, bb, m);
                     }
                     for (int64_t i = dims; i < D; ++i) yr[i] = xr[i];  // dims past `dims` pass through
                   }
                 }
               });
             });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    for (int arg : argnums) {
      if (arg != 0) throw std::invalid_argument("rope: no gradient with respect to the offset");
    }
    auto s = stream();
    return {mx::array(cot[0].shape(), mx::float32, std::make_shared<RoPE>(s, dims_, base_, scale_, !forward_),
                      {cot[0], primals[1]})};
  }

 private:
  int dims_;
  float base_, scale_;
  bool forward_;
  std::shared_ptr<const Angles> angles_;
};

}  // namespace

mx::array rope(const mx::array& x, const mx::array& offset, int dims, float base, float scale,
               mx::StreamOrDevice s) {
  check_float32(x, "rope", "x");
  if (x.ndim() != 4) throw std::invalid_argument("rope: x must be (batch, heads, length, head_dim)");
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(3)) {
    throw std::invalid_argument("rope: dims must be even, positive and at most head_dim");
  }
  if (offset.ndim() > 1 || (offset.size() != 1 && static_cast<int64_t>(offset.size()) != x.shape(0))) {
    throw std::invalid_argument("rope: offset must be a scalar or one per batch row");
  }
  auto st = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RoPE>(st, dims, base, scale, true),
                   {x, mx::contiguous(mx::astype(offset, mx::int32, st), false, st)});
}

}  // namespace tcn
