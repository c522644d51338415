// Attention, fused: for each query row, the scores against its keys, the
// softmax and the weighted sum of the values, without materializing the
// (Lq, Lk) score matrix; causal rows stop at their last visible key.
// Grouped-query: head h reads kv head h / (heads / kv_heads), as MLX does.
//
// Forward work unit: a block of query rows of one kv head. Backward work
// unit: one (batch, kv head), which owns the gradients of its keys and values
// (summed over its query rows in a fixed order) and of its queries.
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "common.h"
#include "mlx/ops.h"
#include "ops.h"

namespace tcn {

namespace {

constexpr int kMaxChunks = 16;  // head_dim <= 128
constexpr float kLowest = std::numeric_limits<float>::lowest();  // MLX's value for a masked-out score

struct Shape4 {
  int64_t B, H, Hk, Lq, Lk, D;
};

// The optional mask as (B, H, Lq, Lk) strides over bool or float data.
struct Mask {
  enum Kind { kNone, kCausal, kBool, kAdd } kind = kNone;
  const bool* b = nullptr;
  const float* f = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

Mask make_mask(const std::string& mode, const std::vector<mx::array>& in, int mask_index) {
  Mask m;
  if (mode == "causal") m.kind = Mask::kCausal;
  if (mode != "array") return m;
  const auto& a = in[mask_index];
  for (int i = 0; i < 4; ++i) m.s[i] = a.strides()[i];
  if (a.dtype() == mx::bool_) {
    m.kind = Mask::kBool;
    m.b = a.data<bool>();
  } else {
    m.kind = Mask::kAdd;
    m.f = a.data<float>();
  }
  return m;
}

// Loads of chunk c of a head_dim-long vector; the last chunk may be partial.
// Masked loads and stores only there: a masked store is slow (microcoded on
// AMD), so a head_dim that is a multiple of 8 never uses one. Keys and values
// may be float16 (a generation's KV cache, half the bytes to read a decode
// step): F16C widens them to float32 exactly, so every sum is the one of the
// float32 kernel on the same, rounded, keys and values.
struct Dim {
  bool partial;
  int rem;
  __m256i tail;
  explicit Dim(int d) : partial(d % 8 != 0), rem(d % 8), tail(tail_mask(d % 8)) {}
  __m256 ld(const float* p, int c, int C) const {
    return (partial && c == C - 1) ? _mm256_maskload_ps(p + 8 * c, tail) : _mm256_loadu_ps(p + 8 * c);
  }
  __m256 ld(const uint16_t* p, int c, int C) const {
    if (partial && c == C - 1) {
      alignas(16) uint16_t t[8] = {};
      std::copy(p + 8 * c, p + 8 * c + rem, t);
      return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
    }
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * c)));
  }
  void st(float* p, int c, int C, __m256 v) const {
    if (partial && c == C - 1) {
      _mm256_maskstore_ps(p + 8 * c, tail, v);
    } else {
      _mm256_storeu_ps(p + 8 * c, v);
    }
  }
};

// Query rows go in blocks of kRows that share one kv head: (head, row)
// pairs of that kv head's query heads, in order. Each key or value row loaded
// then serves kRows queries (one row at a time, attention is bound by reading
// K and V from L2). A block's unused slots hold zero queries and weights.
constexpr int kRows = 4;

struct Block {
  int R = 0;
  int64_t h[kRows], i[kRows];
};

// out[r * ld + j] = x[r] . row_j for j in [0, n); rows at base + j * stride.
// Two keys at a time; a partial last pair repeats its key. Every dot product
// is summed in the same order (over chunks, then hsum8's lane tree).
template <int C, class T>
void block_dots(const Dim& dim, const __m256 (*x)[C], const T* base, int64_t stride, int n, float* out,
                int64_t ld) {
  alignas(32) float lanes[8];
  for (int j = 0; j < n; j += 2) {
    const T* k0 = base + j * stride;
    const T* k1 = base + std::min(j + 1, n - 1) * stride;
    __m256 acc[2 * kRows];
    for (auto& a : acc) a = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const __m256 a = dim.ld(k0, c, C), b = dim.ld(k1, c, C);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        acc[2 * r] = _mm256_fmadd_ps(a, x[r][c], acc[2 * r]);
        acc[2 * r + 1] = _mm256_fmadd_ps(b, x[r][c], acc[2 * r + 1]);
      }
    }
    _mm256_store_ps(lanes, hsum8(acc));
    for (int r = 0; r < kRows; ++r) {
      out[r * ld + j] = lanes[2 * r];
      if (j + 1 < n) out[r * ld + j + 1] = lanes[2 * r + 1];
    }
  }
}

// out[r] = sum_j w[r * ld + j] row_j over j in [0, n), in order of j; rows at
// base + j * stride. Two chunks of head_dim at a time, for every row.
template <int C, class T>
void block_wsum(const Dim& dim, const float* w, int64_t ld, const T* base, int64_t stride, int n,
                __m256 (*out)[C]) {
#pragma GCC unroll 8
  for (int c0 = 0; c0 < C; c0 += 2) {
    const bool two = c0 + 1 < C;
    __m256 acc[kRows][2];
    for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const T* row = base + j * stride;
      const __m256 a = dim.ld(row, c0, C), b = two ? dim.ld(row, c0 + 1, C) : a;
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m256 wr = _mm256_broadcast_ss(w + r * ld + j);
        acc[r][0] = _mm256_fmadd_ps(wr, a, acc[r][0]);
        if (two) acc[r][1] = _mm256_fmadd_ps(wr, b, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      out[r][c0] = acc[r][0];
      if (two) out[r][c0 + 1] = acc[r][1];
    }
  }
}

// The rows (h, i) of block `k` of kv head hk.
Block block_at(const Shape4& sh, int64_t hk, int64_t k) {
  const int64_t rep = sh.H / sh.Hk, first = k * kRows;
  Block blk;
  blk.R = static_cast<int>(std::min<int64_t>(kRows, rep * sh.Lq - first));
  for (int r = 0; r < blk.R; ++r) {
    blk.h[r] = hk * rep + (first + r) / sh.Lq;
    blk.i[r] = (first + r) % sh.Lq;
  }
  return blk;
}

template <int C>
void load_rows(const Dim& dim, const Rows4& a, int64_t b, const Block& blk, __m256 (*x)[C]) {
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) x[r][c] = r < blk.R ? dim.ld(a.row(b, blk.h[r], blk.i[r]), c, C) : _mm256_setzero_ps();
  }
}

// One past the last key a row sees under a bool mask; Lk when it sees none.
// A causal mask given as an array (mlx-lm's batched KV cache makes one for
// every prefill) hides each row's tail: about half the scores of a prefill,
// each a head_dim-long dot product, against one byte read each here. Every
// bit of the output stays as it was: a hidden key's score is MLX's lowest,
// its weight an exact 0 (see first_key).
int64_t last_key(const Mask& mask, const Shape4& sh, int64_t b, const Block& blk, int r) {
  const bool* row = mask.b + b * mask.s[0] + blk.h[r] * mask.s[1] + blk.i[r] * mask.s[2];
  int64_t j = sh.Lk;
  while (j > 0 && !row[(j - 1) * mask.s[3]]) --j;
  return j == 0 ? sh.Lk : j;
}

// Scores of a block's rows, s[r * Lk + j] = scale * q_r . k_j + mask, for
// the n[r] keys row r sees (up to its last visible one under a causal or a
// bool mask; all Lk of them, every score at MLX's masked value, when a row
// sees none), from key `lo` on (`first_key`; the scores before it are left
// unwritten). Returns the largest n.
template <int C, class T>
int block_scores(const Dim& dim, const Shape4& sh, const Mask& mask, float scale, int64_t b, const Block& blk,
                 const __m256 (*q)[C], const T* k0, int64_t kst, float* s, int* n, int lo = 0) {
  bool none[kRows] = {};
  int n_max = 0;
  for (int r = 0; r < blk.R; ++r) {
    n[r] = sh.Lk;
    if (mask.kind == Mask::kCausal) n[r] = std::min<int64_t>(sh.Lk, blk.i[r] + sh.Lk - sh.Lq + 1);
    if (mask.kind == Mask::kBool) n[r] = static_cast<int>(last_key(mask, sh, b, blk, r));
    none[r] = n[r] <= 0;
    if (none[r]) n[r] = sh.Lk;
    n_max = std::max(n_max, n[r]);
  }
  block_dots<C, T>(dim, q, k0 + lo * kst, kst, n_max - lo, s + lo, sh.Lk);
  const __m256 sv = _mm256_set1_ps(scale);
  for (int r = 0; r < blk.R; ++r) {
    float* sr = s + r * sh.Lk;
    if (none[r]) {
      std::fill(sr, sr + sh.Lk, kLowest);
      continue;
    }
    for (int j = lo; j < n[r]; j += 8) store(sr + j, _mm256_mul_ps(load(sr + j, n[r] - j), sv), n[r] - j);
    if (mask.kind == Mask::kBool || mask.kind == Mask::kAdd) {
      const int64_t off = b * mask.s[0] + blk.h[r] * mask.s[1] + blk.i[r] * mask.s[2];
      for (int j = lo; j < n[r]; ++j) {
        if (mask.kind == Mask::kBool) {
          if (!mask.b[off + j * mask.s[3]]) sr[j] = kLowest;
        } else {
          sr[j] += mask.f[off + j * mask.s[3]];
        }
      }
    }
  }
  return n_max;
}

// In place: s[j] = exp(s[j] - max); returns (max, sum).
std::pair<float, float> exp_shifted(float* s, int n) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 8) {
    __m256 v = n - j >= 8 ? _mm256_loadu_ps(s + j) : _mm256_blendv_ps(
        _mm256_set1_ps(-INFINITY), load(s + j, n - j), _mm256_castsi256_ps(tail_mask(n - j)));
    mv = _mm256_max_ps(mv, v);
  }
  float m = -INFINITY;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  for (float x : lanes) m = std::max(m, x);
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(load(s + j, n - j), m8));
    if (n - j < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(n - j)));
    store(s + j, e, n - j);
    acc = _mm256_add_ps(acc, e);
  }
  return {m, hsum(acc)};
}

// Where a block's rows start reading keys: the first key any of them sees
// under a bool mask, rounded down to a multiple of 8; 0 for other masks or
// when a row sees no key (it then averages over all of them, as MLX does).
// The keys before it are the left padding of a batched KV cache (mlx-lm's
// BatchKVCache): in decode a row's padding can be most of what it would
// read. Skipping them leaves every bit as it was: each would add an exact 0
// to the softmax's sum and to the weighted sum, and exp_shifted sums in 8
// lanes by key index, which a multiple of 8 keeps.
int first_key(const Mask& mask, const Shape4& sh, int64_t b, const Block& blk) {
  if (mask.kind != Mask::kBool) return 0;
  int64_t lo = sh.Lk;
  for (int r = 0; r < blk.R; ++r) {
    const bool* row = mask.b + b * mask.s[0] + blk.h[r] * mask.s[1] + blk.i[r] * mask.s[2];
    int64_t j = 0;
    while (j < sh.Lk && !row[j * mask.s[3]]) ++j;
    if (j == sh.Lk) return 0;
    lo = std::min(lo, j);
  }
  return static_cast<int>(lo / 8 * 8);
}

template <class T>
int64_t key_stride(const Rows<T>& k, int64_t Lk) { return Lk > 1 ? k.row(0, 0, 1) - k.row(0, 0, 0) : 0; }

int64_t blocks_per_kv_head(const Shape4& sh) { return (sh.H / sh.Hk * sh.Lq + kRows - 1) / kRows; }

template <int C, class T>
void forward(const Shape4& sh, const Mask& mask, float scale, const Rows4& Q, const Rows<T>& K, const Rows<T>& V,
             float* out, float* stats) {
  const int64_t kst = key_stride(K, sh.Lk), vst = key_stride(V, sh.Lk), nb = blocks_per_kv_head(sh);
  parallel_for(sh.B * sh.Hk * nb, 1, [&](int64_t u0, int64_t u1) {
    const Dim dim(sh.D);
    std::vector<float> s(kRows * sh.Lk);
    __m256 q[kRows][C], acc[kRows][C];
    int n[kRows];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / (sh.Hk * nb), hk = (u / nb) % sh.Hk;
      const Block blk = block_at(sh, hk, u % nb);
      load_rows<C>(dim, Q, b, blk, q);
      const int lo = first_key(mask, sh, b, blk);
      const int n_max = block_scores<C, T>(dim, sh, mask, scale, b, blk, q, K.row(b, hk, 0), kst, s.data(), n, lo);
      float m[kRows], l[kRows];
      for (int r = 0; r < kRows; ++r) {
        float* sr = s.data() + r * sh.Lk;
        if (r < blk.R) {
          std::tie(m[r], l[r]) = exp_shifted(sr + lo, n[r] - lo);
          std::fill(sr + n[r], sr + n_max, 0.0f);
        } else {
          std::fill(sr + lo, sr + n_max, 0.0f);
        }
      }
      block_wsum<C, T>(dim, s.data() + lo, sh.Lk, V.row(b, hk, lo), vst, n_max - lo, acc);
      for (int r = 0; r < blk.R; ++r) {
        const int64_t row = (b * sh.H + blk.h[r]) * sh.Lq + blk.i[r];
        const __m256 inv = _mm256_set1_ps(1.0f / l[r]);
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) dim.st(out + row * sh.D, c, C, _mm256_mul_ps(acc[r][c], inv));
        stats[2 * row] = m[r];
        stats[2 * row + 1] = l[r];
      }
    }
  });
}

// dq, dk, dv (contiguous) from the forward's inputs, its output o, its
// per-row (max, sum) and the output's cotangent g. One unit per kv head:
// its dk and dv sum over its query heads' rows in order.
template <int C>
void backward(const Shape4& sh, const Mask& mask, float scale, const Rows4& Q, const Rows4& K, const Rows4& V,
              const float* o, const float* stats, const Rows4& G, float* dq, float* dk, float* dv) {
  const int64_t kst = key_stride(K, sh.Lk), vst = key_stride(V, sh.Lk), nb = blocks_per_kv_head(sh);
  parallel_for(sh.B * sh.Hk, 1, [&](int64_t u0, int64_t u1) {
    const Dim dim(sh.D);
    std::vector<float> p(kRows * sh.Lk), ds(kRows * sh.Lk);
    __m256 q[kRows][C], g[kRows][C], acc[kRows][C];
    int n[kRows];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / sh.Hk, hk = u % sh.Hk;
      const float* k0 = K.row(b, hk, 0);
      const float* v0 = V.row(b, hk, 0);
      float* dk0 = dk + u * sh.Lk * sh.D;
      float* dv0 = dv + u * sh.Lk * sh.D;
      std::fill(dk0, dk0 + sh.Lk * sh.D, 0.0f);
      std::fill(dv0, dv0 + sh.Lk * sh.D, 0.0f);
      for (int64_t k = 0; k < nb; ++k) {
        const Block blk = block_at(sh, hk, k);
        load_rows<C>(dim, Q, b, blk, q);
        load_rows<C>(dim, G, b, blk, g);
        const int n_max = block_scores<C>(dim, sh, mask, scale, b, blk, q, k0, kst, p.data(), n);
        block_dots<C>(dim, g, v0, vst, n_max, ds.data(), sh.Lk);
        for (int r = 0; r < kRows; ++r) {
          float* pr = p.data() + r * sh.Lk;
          float* dsr = ds.data() + r * sh.Lk;
          if (r >= blk.R) {
            std::fill(pr, pr + n_max, 0.0f);
            std::fill(dsr, dsr + n_max, 0.0f);
            continue;
          }
          // p = exp(s - max) / sum, exactly the forward's probabilities;
          // ds = p (g . v - g . o), but 0 where a bool mask (or a causal row
          // with no key) replaced the score: it does not depend on q and k
          // there (MLX's where() passes no gradient). Nothing past the
          // row's last visible key.
          const int64_t row = (b * sh.H + blk.h[r]) * sh.Lq + blk.i[r];
          const __m256 m8 = _mm256_set1_ps(stats[2 * row]), inv = _mm256_set1_ps(1.0f / stats[2 * row + 1]);
          const __m256 lowest = _mm256_set1_ps(kLowest);
          __m256 d8 = _mm256_setzero_ps();
          for (int c = 0; c < C; ++c) d8 = _mm256_fmadd_ps(g[r][c], dim.ld(o + row * sh.D, c, C), d8);
          const __m256 delta = _mm256_set1_ps(hsum(d8));
          for (int j = 0; j < n[r]; j += 8) {
            const __m256 sj = load(pr + j, n[r] - j);
            const __m256 pj = _mm256_mul_ps(exp8(_mm256_sub_ps(sj, m8)), inv);
            const __m256 dsj = _mm256_mul_ps(pj, _mm256_sub_ps(load(dsr + j, n[r] - j), delta));
            store(pr + j, pj, n[r] - j);
            store(dsr + j, _mm256_andnot_ps(_mm256_cmp_ps(sj, lowest, _CMP_EQ_OQ), dsj), n[r] - j);
          }
          std::fill(pr + n[r], pr + n_max, 0.0f);
          std::fill(dsr + n[r], dsr + n_max, 0.0f);
        }
        // dq_r = scale sum_j ds_rj k_j
        block_wsum<C>(dim, ds.data(), sh.Lk, k0, kst, n_max, acc);
        const __m256 sv = _mm256_set1_ps(scale);
        for (int r = 0; r < blk.R; ++r) {
          const int64_t row = (b * sh.H + blk.h[r]) * sh.Lq + blk.i[r];
#pragma GCC unroll 16
          for (int c = 0; c < C; ++c) dim.st(dq + row * sh.D, c, C, _mm256_mul_ps(acc[r][c], sv));
        }
        // dk_j += scale ds_rj q_r; dv_j += p_rj g_r, over the block's rows in order.
        for (int j = 0; j < n_max; ++j) {
          float* dkj = dk0 + j * sh.D;
          float* dvj = dv0 + j * sh.D;
          __m256 dsj[kRows], pj[kRows];
          for (int r = 0; r < kRows; ++r) {
            dsj[r] = _mm256_set1_ps(scale * ds[r * sh.Lk + j]);
            pj[r] = _mm256_set1_ps(p[r * sh.Lk + j]);
          }
#pragma GCC unroll 16
          for (int c = 0; c < C; ++c) {
            __m256 tk = dim.ld(dkj, c, C), tv = dim.ld(dvj, c, C);
#pragma GCC unroll 4
            for (int r = 0; r < kRows; ++r) {
              tk = _mm256_fmadd_ps(dsj[r], q[r][c], tk);
              tv = _mm256_fmadd_ps(pj[r], g[r][c], tv);
            }
            dim.st(dkj, c, C, tk);
            dim.st(dvj, c, C, tv);
          }
        }
      }
    }
  });
}

// Calls f.template operator()<C>() with C = the chunk count of head_dim.
template <class F>
void with_chunks(int64_t D, F&& f) {
  switch ((D + 7) / 8) {
#define TCN_CASE(c) \
  case c:           \
    return f.template operator()<c>();
    TCN_CASE(1) TCN_CASE(2) TCN_CASE(3) TCN_CASE(4) TCN_CASE(5) TCN_CASE(6) TCN_CASE(7) TCN_CASE(8)
    TCN_CASE(9) TCN_CASE(10) TCN_CASE(11) TCN_CASE(12) TCN_CASE(13) TCN_CASE(14) TCN_CASE(15) TCN_CASE(16)
#undef TCN_CASE
  }
  throw std::invalid_argument("attention: head_dim must be at most 128");
}

Shape4 shape_of(const mx::array& q, const mx::array& k) {
  return {q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3)};
}

class AttentionVJP : public NativePrimitive {
 public:
  AttentionVJP(mx::Stream s, float scale, std::string mode) : NativePrimitive(s), scale_(scale), mode_(mode) {}
  const char* name() const override { return "ToolcallAttentionVJP"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& a = static_cast<const AttentionVJP&>(o);
    return scale_ == a.scale_ && mode_ == a.mode_;
  }

  // Inputs: q, k, v, [mask], o, stats, g. Outputs: dq, dk, dv.
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& a : out) allocate(a);
    dispatch(stream(), in, out, [in, out, scale = scale_, mode = mode_]() mutable {
      const size_t n = in.size();
      const Shape4 sh = shape_of(in[0], in[1]);
      const Mask mask = make_mask(mode, in, 3);
      const Rows4 Q(in[0]), K(in[1]), V(in[2]), G(in[n - 1]);
      with_chunks(sh.D, [&]<int C>() {
        backward<C>(sh, mask, scale, Q, K, V, in[n - 3].data<float>(), in[n - 2].data<float>(), G,
                    out[0].data<float>(), out[1].data<float>(), out[2].data<float>());
      });
    });
  }

 private:
  float scale_;
  std::string mode_;
};

class Attention : public NativePrimitive {
 public:
  Attention(mx::Stream s, float scale, std::string mode) : NativePrimitive(s), scale_(scale), mode_(mode) {}
  const char* name() const override { return "ToolcallAttention"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& a = static_cast<const Attention&>(o);
    return scale_ == a.scale_ && mode_ == a.mode_;
  }

  // Inputs: q, k, v, [mask]. Outputs: o, and each row's (max, sum) for the backward.
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& a : out) allocate(a);
    dispatch(stream(), in, out, [in, out, scale = scale_, mode = mode_]() mutable {
      const Shape4 sh = shape_of(in[0], in[1]);
      const Mask mask = make_mask(mode, in, 3);
      const Rows4 Q(in[0]);
      if (in[1].dtype() == mx::float16) {
        const Rows<uint16_t> K(in[1]), V(in[2]);
        with_chunks(sh.D, [&]<int C>() {
          forward<C, uint16_t>(sh, mask, scale, Q, K, V, out[0].data<float>(), out[1].data<float>());
        });
      } else {
        const Rows4 K(in[1]), V(in[2]);
        with_chunks(sh.D, [&]<int C>() {
          forward<C, float>(sh, mask, scale, Q, K, V, out[0].data<float>(), out[1].data<float>());
        });
      }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    for (int arg : argnums) {
      if (arg > 2) throw std::invalid_argument("attention: no gradient with respect to the mask");
    }
    if (primals[1].dtype() != mx::float32) {
      throw std::invalid_argument("attention: gradients need float32 keys and values (float16 is for a KV cache)");
    }
    auto s = stream();
    std::vector<mx::array> inputs = primals;
    inputs.push_back(outputs[0]);
    inputs.push_back(outputs[1]);
    inputs.push_back(cot[0]);
    auto grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                        {mx::float32, mx::float32, mx::float32},
                                        std::make_shared<AttentionVJP>(s, scale_, mode_), inputs);
    std::vector<mx::array> picked;
    for (int arg : argnums) picked.push_back(grads[arg]);
    return picked;
  }

 private:
  float scale_;
  std::string mode_;
};

}  // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    const std::string& mask_mode, const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  check_float32(q, "attention", "q");
  if (k.dtype() != v.dtype() || (k.dtype() != mx::float32 && k.dtype() != mx::float16)) {
    throw std::invalid_argument("attention: k and v must both be float32 or both float16");
  }
  for (auto* a : {&q, &k, &v}) {
    if (a->ndim() != 4) throw std::invalid_argument("attention: q, k, v must be (batch, heads, length, head_dim)");
  }
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3) ||
      q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument("attention: q (B, H, Lq, D) needs k, v (B, Hk, Lk, D) with H a multiple of Hk");
  }
  if (q.shape(3) > 8 * kMaxChunks) throw std::invalid_argument("attention: head_dim must be at most 128");
  if ((mask_mode == "array") != mask.has_value() || (mask_mode != "" && mask_mode != "causal" && mask_mode != "array")) {
    throw std::invalid_argument("attention: mask_mode must be '', 'causal', or 'array' with a mask");
  }
  auto st = mx::to_stream(s);
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    auto m = mask->dtype() == mx::bool_ ? *mask : mx::astype(*mask, mx::float32, st);
    inputs.push_back(mx::broadcast_to(m, {q.shape(0), q.shape(1), q.shape(2), k.shape(2)}, st));
  }
  mx::Shape stats_shape = {q.shape(0), q.shape(1), q.shape(2), 2};
  return mx::array::make_arrays({q.shape(), stats_shape}, {mx::float32, mx::float32},
                                std::make_shared<Attention>(st, scale, mask_mode), inputs)[0];
}

}  // namespace tcn
