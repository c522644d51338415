// Shared pieces of the toolcall CPU kernels: the thread pool, AVX2 math that
// reproduces MLX's own CPU formulas, and strided row access.
//
// Determinism: every kernel splits its work into independent units (rows,
// (batch, head) pairs) that are computed the same way whichever thread runs
// them, so results are bit-identical run to run and for any thread count.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace tcn {

namespace mx = mlx::core;

// ---------------------------------------------------------------- threads

// Threads the kernels use (default: the cores this process may run on).
int threads();
void set_threads(int n);

// Run task(k) for k in [0, n_tasks), k = 0 on the calling thread. One run
// at a time (tasks must not nest); like MLX's own threads, the pool does not
// survive a fork (the pipeline's worker processes are spawned).
void run_tasks(int n_tasks, const std::function<void(int)>& task);

// f(begin, end) over [0, n) in contiguous chunks, one per thread; a chunk
// holds at least `grain` units (small work stays on the calling thread).
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  int64_t t = std::min<int64_t>(threads(), n / std::max<int64_t>(grain, 1));
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
  run_tasks(static_cast<int>(t), [&](int k) { f(n * k / t, n * (k + 1) / t); });
}

// ---------------------------------------------------------------- AVX2 math

// Lanes [0, n) of 8 selected: a mask for the tail of a row whose length is
// not a multiple of 8 (masked loads read nothing past the row).
inline __m256i tail_mask(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}
inline __m256 load(const float* p, int n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n));
}
inline void store(float* p, __m256 v, int n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, tail_mask(n), v);
  }
}

// MLX's CPU exp (mlx/backend/cpu/simd/math.h: Cephes polynomial for 2^x),
// the same operations in the same order, 8 lanes at a time: bit-identical.
inline __m256 exp8(__m256 in) {
  __m256 x = _mm256_mul_ps(in, _mm256_set1_ps(1.442695f));
  __m256 ipart = _mm256_floor_ps(_mm256_add_ps(x, _mm256_set1_ps(0.5f)));
  __m256 f = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(e), p);
  r = _mm256_blendv_ps(r, in, _mm256_cmp_ps(in, in, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(
      r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(in, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(
      r, _mm256_setzero_ps(), _mm256_cmp_ps(in, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
}

// MLX's CPU sigmoid (unary_ops.h): y = 1 / (1 + exp(|x|)), x < 0 ? y : 1 - y.
inline __m256 sigmoid8(__m256 x) {
  __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  __m256 one = _mm256_set1_ps(1.0f);
  __m256 y = _mm256_div_ps(one, _mm256_add_ps(one, exp8(ax)));
  return _mm256_blendv_ps(
      _mm256_sub_ps(one, y), y, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

// Sum of the 8 lanes (always in the same order).
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane j of the result = the sum of the lanes of a[j]: 8 dot products at once.
inline __m256 hsum8(const __m256* a) {
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(
      _mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// ---------------------------------------------------------------- arrays

// A rank-4 array of T (float, or uint16_t for float16's bits) as rows of its
// last axis, whatever its strides (a transposed view, a slice of the KV
// cache): rows are read in place when the last axis is contiguous, else from a
// packed copy.
template <class T>
class Rows {
 public:
  explicit Rows(const mx::array& a) {
    auto& st = a.strides();
    auto& sh = a.shape();
    if (st[3] == 1 || sh[3] == 1) {
      base_ = a.data<T>();
      for (int i = 0; i < 3; ++i) s_[i] = st[i];
      return;
    }
    packed_.resize(a.size());
    const T* src = a.data<T>();
    T* dst = packed_.data();
    for (int64_t i = 0; i < sh[0]; ++i)
      for (int64_t j = 0; j < sh[1]; ++j)
        for (int64_t k = 0; k < sh[2]; ++k)
          for (int64_t l = 0; l < sh[3]; ++l) *dst++ = src[i * st[0] + j * st[1] + k * st[2] + l * st[3]];
    base_ = packed_.data();
    s_[0] = int64_t(sh[1]) * sh[2] * sh[3];
    s_[1] = int64_t(sh[2]) * sh[3];
    s_[2] = sh[3];
  }
  const T* row(int64_t i, int64_t j, int64_t k) const { return base_ + i * s_[0] + j * s_[1] + k * s_[2]; }

 private:
  const T* base_;
  int64_t s_[3];
  std::vector<T> packed_;
};
using Rows4 = Rows<float>;

// Allocate a primitive's (contiguous) output.
inline void allocate(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// The CPU-only part every primitive here shares.
class NativePrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }
};

// Run `f` on the CPU stream after the inputs are ready, keeping them alive.
template <class F>
void dispatch(mx::Stream s, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs, F&& f) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (auto& a : inputs) enc.set_input_array(a);
  for (auto& a : outputs) enc.set_output_array(a);
  enc.dispatch(std::forward<F>(f));
}

void check_float32(const mx::array& a, const char* op, const char* what);

}  // namespace tcn
