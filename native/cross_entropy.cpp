// Cross-entropy of each row of logits against its target class, as
// mlx.nn.losses.cross_entropy: loss = logsumexp(row) - row[target], one row
// per unit (a vocabulary-long row is plenty of work). Gradient:
// d logits = g * (exp(row - logsumexp) - onehot(target)).
#include <cmath>
#include <limits>

#include "common.h"
#include "mlx/ops.h"
#include "ops.h"

namespace tcn {

namespace {

// logsumexp of a row, max-shifted, with MLX's exp.
float logsumexp(const float* x, int64_t v) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < v; j += 8) {
    const int m = static_cast<int>(std::min<int64_t>(8, v - j));
    mv = _mm256_max_ps(mv, m == 8 ? _mm256_loadu_ps(x + j)
                                  : _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), load(x + j, m),
                                                     _mm256_castsi256_ps(tail_mask(m))));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float mx_ = -INFINITY;
  for (float l : lanes) mx_ = std::max(mx_, l);
  const __m256 m8 = _mm256_set1_ps(mx_);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < v; j += 8) {
    const int m = static_cast<int>(std::min<int64_t>(8, v - j));
    __m256 e = exp8(_mm256_sub_ps(load(x + j, m), m8));
    if (m < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(m)));
    acc = _mm256_add_ps(acc, e);
  }
  return mx_ + std::log(hsum(acc));
}

// A target outside [0, V) has no logit: NaN, not a read past the row.
float logit_at(const float* row, int64_t v, int32_t t) {
  return (t >= 0 && t < v) ? row[t] : std::numeric_limits<float>::quiet_NaN();
}

class CrossEntropyVJP : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "ToolcallCrossEntropyVJP"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }

  // Inputs: logits, targets, logsumexp, g. Output: d logits.
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    allocate(out[0]);
    dispatch(stream(), in, out, [x = in[0], t = in[1], lse = in[2], g = in[3], dx = out[0]]() mutable {
      const int64_t v = x.shape(-1);
      const float *xp = x.data<float>(), *lp = lse.data<float>(), *gp = g.data<float>();
      const int32_t* tp = t.data<int32_t>();
      float* dp = dx.data<float>();
      parallel_for(x.size() / v, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const __m256 l8 = _mm256_set1_ps(lp[r]), g8 = _mm256_set1_ps(gp[r]);
          for (int64_t j = 0; j < v; j += 8) {
            const int m = static_cast<int>(std::min<int64_t>(8, v - j));
            store(dp + r * v + j, _mm256_mul_ps(g8, exp8(_mm256_sub_ps(load(xp + r * v + j, m), l8))), m);
          }
          if (tp[r] >= 0 && tp[r] < v) dp[r * v + tp[r]] -= gp[r];
        }
      });
    });
  }
};

class CrossEntropy : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "ToolcallCrossEntropy"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }

  // Inputs: logits, targets. Outputs: loss, logsumexp (for the backward).
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& a : out) allocate(a);
    dispatch(stream(), in, out, [x = in[0], t = in[1], loss = out[0], lse = out[1]]() mutable {
      const int64_t v = x.shape(-1);
      const float* xp = x.data<float>();
      const int32_t* tp = t.data<int32_t>();
      float *lossp = loss.data<float>(), *lsep = lse.data<float>();
      parallel_for(x.size() / v, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          lsep[r] = logsumexp(xp + r * v, v);
          lossp[r] = lsep[r] - logit_at(xp + r * v, v, tp[r]);
        }
      });
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    for (int arg : argnums) {
      if (arg != 0) throw std::invalid_argument("cross_entropy: no gradient with respect to the targets");
    }
    auto s = stream();
    return {mx::array(primals[0].shape(), mx::float32, std::make_shared<CrossEntropyVJP>(s),
                      {primals[0], primals[1], outputs[1], mx::contiguous(cot[0], false, s)})};
  }
};

}  // namespace

mx::array cross_entropy(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s) {
  check_float32(logits, "cross_entropy", "logits");
  mx::Shape rows(logits.shape().begin(), logits.shape().end() - 1);
  if (logits.ndim() < 1 || targets.shape() != rows || !mx::issubdtype(targets.dtype(), mx::integer)) {
    throw std::invalid_argument("cross_entropy: targets must be integers shaped like logits without its last axis");
  }
  auto st = mx::to_stream(s);
  return mx::array::make_arrays({rows, rows}, {mx::float32, mx::float32}, std::make_shared<CrossEntropy>(st),
                                {mx::contiguous(logits, false, st),
                                 mx::contiguous(mx::astype(targets, mx::int32, st), false, st)})[0];
}

}  // namespace tcn
