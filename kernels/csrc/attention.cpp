// Fused causal attention of the model's blocks (CPU), forward and backward:
//
//   out[b, i, h, :] = sum_j drop(P)[b, h, i, j] v[b, h, j, :],
//   P[b, h, i, :]   = softmax_j(q[b, h, i, :] . k[b, h, j, :] / sqrt(D) over the visible keys),
//
// read straight from the packed qkv projection ``(B, T, 3, H, D)`` (no q/k/v copies), with optional
// prefix keys/values ``(B, H, Tp, D)`` in front of the own keys (the cached prompt in evaluation),
// written as ``(B, Tq, H * D)`` (no transpose copy). Key j is visible to query i (at key position
// qpos[i]) iff ``(j <= qpos[i] and key_valid[b, j]) or j == qpos[i]`` (kernels/reference.py's
// ``attention_mask``). Dropout on P uses dropout.cpp's counter-based keep mask over the flat index
// ((b * H + h) * Tq + i) * Tk + j, so it equals kernels.dropout applied to the (B, H, Tq, Tk)
// probability tensor with the same seed; the backward recomputes it and P (from the saved
// log-sum-exp), storing nothing else. Arithmetic in fp32 (bf16 inputs are widened), except that
// with bf16 inputs, a head size that is a multiple of 32 and AVX512-BF16, the five products take
// bf16 operands on dot-product instructions (forward_bf16 / backward_bf16 below).
// qkv_bias (optional, fp32 (3 H D)): the projection's bias, added to every own token's q, k and v as
// they are widened, so the projection GEMM need not write it (the gradient of the bias is the
// column sum of the returned dqkv, left to the caller).
//
// Work is split over batch rows: each row's keys/values of all heads are read once in memory order
// into small fp32 buffers (L2), then every head is done from there.
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"  // (HARMODT_AVX2: AVX2 and FMA without AVX-512, where 8-lane micro-kernels run)

namespace harmodt {
namespace {

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// dst[i] = src[i] (widened to fp32) [+ bias[i] when bias is given], i < d.
template <typename T>
inline void load_row(const T* src, int64_t d, float* dst, const float* bias = nullptr) {
  int64_t i = 0;
#if defined(HARMODT_AVX512_CVT)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= d; i += 16) {  // common.h's load16: fp32, or bf16 widened exactly
      const __m512 v = load16(src + i, static_cast<__mmask16>(0xFFFF));
      _mm512_storeu_ps(dst + i, bias == nullptr ? v : _mm512_add_ps(v, _mm512_loadu_ps(bias + i)));
    }
  }
#elif defined(HARMODT_AVX2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    for (; i + 8 <= d; i += 8) {  // common.h's load8: fp32, or bf16 widened exactly
      const __m256 v = load8(src + i);
      _mm256_storeu_ps(dst + i, bias == nullptr ? v : _mm256_add_ps(v, _mm256_loadu_ps(bias + i)));
    }
  }
#endif
  if (bias == nullptr)
    for (; i < d; ++i) dst[i] = static_cast<float>(src[i]);
  else
    for (; i < d; ++i) dst[i] = static_cast<float>(src[i]) + bias[i];
}
template <typename T>
inline void store_row(const float* src, int64_t d, T* dst) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // fp32 -> bf16, round to nearest even (as c10)
    uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
    for (; i + 16 <= d; i += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d16 + i), reinterpret_cast<const __m256i&>(v));
    }
  }
#elif defined(HARMODT_AVX2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)
    for (; i + 8 <= d; i += 8) store8(dst + i, _mm256_loadu_ps(src + i));  // (bf16: rounded as c10)
#endif
  for (; i < d; ++i) dst[i] = static_cast<T>(src[i]);
}

#if defined(__AVX512F__)
inline __mmask16 tail16(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u); }

// e^x for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial, ~1 ulp).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#elif defined(HARMODT_AVX2)
inline __m256i tail8(int64_t left) { return tail_mask8(left); }  // lanes i < left
inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}

// e^x for x <= 0: exp512's Cephes expf on 8 lanes; 2^n (n in [-126, 0]) built from its exponent bits.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// The 16-column blocks of n columns, four at a time, then the 1-3 left: f(std::integral_constant<int,
// NB>{}, first block) per group (the score micro-kernels' column walk).
template <typename F>
inline void by_column_blocks(int64_t n, F&& f) {
  const int64_t nb = (n + 15) / 16;
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) f(std::integral_constant<int, 4>{}, b);
  switch (nb - b) {
    case 3: return f(std::integral_constant<int, 3>{}, b);
    case 2: return f(std::integral_constant<int, 2>{}, b);
    case 1: return f(std::integral_constant<int, 1>{}, b);
    default: return;
  }
}

// Register-blocked micro-kernels over up to 6 rows at once (R rows share every load of the
// right-hand side; 6 rows x 4 column blocks = 24 independent accumulators).

#if defined(__AVX512F__)
// The operands of the products summed over keys or queries below, as they are broadcast and loaded,
// and their multiply-add into fp32 accumulators: fp32 values on FMA here, bf16 pair words on
// vdpbf16ps (Bf16Products, further down: two products per lane). One kernel body serves both.
struct Fp32Products {
  using W = float;
  static __m512 bcast(float w) { return _mm512_set1_ps(w); }
  static __m512 load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 madd(__m512 acc, __m512 w, __m512 v) { return _mm512_fmadd_ps(w, v, acc); }
};

// s[r * ld + 16 * (b0 + g) ...] = scale * sum_{k < kn} x[r * kn + k] . mt[k * ld + 16 * (b0 + g) ...]
// for r < R, g < NB (kn: the sum's length in operands of P).
template <typename P, int R, int NB>
inline void scores_keys(const typename P::W* x, const typename P::W* mt, int64_t kn, int64_t ld, int64_t b0, float scale, float* s) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < NB; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kn; ++k) {
    decltype(P::load(mt)) m[NB];
    for (int g = 0; g < NB; ++g) m[g] = P::load(mt + k * ld + (b0 + g) * 16);
    for (int r = 0; r < R; ++r) {
      const auto xr = P::bcast(x[r * kn + k]);
      for (int g = 0; g < NB; ++g) acc[r][g] = P::madd(acc[r][g], xr, m[g]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < NB; ++g) _mm512_storeu_ps(s + r * ld + (b0 + g) * 16, _mm512_mul_ps(acc[r][g], vs));
}

// out[r * d + c] = sum_{j < n} w[r * ldw + j] . m[j * d + c] for r < R (columns in chunks of 32).
template <typename P, int R>
inline void combine_block(const typename P::W* w, int64_t ldw, const typename P::W* m, int64_t n, int64_t d, float* out) {
  for (int64_t c = 0; c < d; c += 32) {
    const __mmask16 l0 = tail16(d - c), l1 = d - c > 16 ? tail16(d - c - 16) : __mmask16(0);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const auto v0 = P::load(l0, m + j * d + c), v1 = P::load(l1, m + j * d + c + 16);
      for (int r = 0; r < R; ++r) {
        const auto wr = P::bcast(w[r * ldw + j]);
        acc[r][0] = P::madd(acc[r][0], wr, v0);
        acc[r][1] = P::madd(acc[r][1], wr, v1);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(out + r * d + c, l0, acc[r][0]);
      _mm512_mask_storeu_ps(out + r * d + c + 16, l1, acc[r][1]);
    }
  }
}

// out[(j0 + r) * d + c] = sum_{i0 <= i < rows} p[i * ld + j0 + r] . a[i * d + c] for r < R: p^T a
// without a transpose (see pt_times_a_block).
template <typename P, int R>
inline void pt_times_a_keys(const typename P::W* p, const typename P::W* a, int64_t i0, int64_t rows, int64_t ld, int64_t d, int64_t j0,
                            float* out) {
  for (int64_t c = 0; c < d; c += 32) {
    const __mmask16 l0 = tail16(d - c), l1 = d - c > 16 ? tail16(d - c - 16) : __mmask16(0);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t i = i0; i < rows; ++i) {
      const auto v0 = P::load(l0, a + i * d + c), v1 = P::load(l1, a + i * d + c + 16);
      const typename P::W* pi = p + i * ld + j0;
      for (int r = 0; r < R; ++r) {
        const auto w = P::bcast(pi[r]);
        acc[r][0] = P::madd(acc[r][0], w, v0);
        acc[r][1] = P::madd(acc[r][1], w, v1);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(out + (j0 + r) * d + c, l0, acc[r][0]);
      _mm512_mask_storeu_ps(out + (j0 + r) * d + c + 16, l1, acc[r][1]);
    }
  }
}

// scores_keys over the 16-column blocks of n columns (R x 4 accumulators: 24 of 32 registers at R = 6).
template <typename P, int R>
inline void scores_keys_rows(const typename P::W* x, const typename P::W* mt, int64_t kn, int64_t ld, int64_t n, float scale, float* s) {
  by_column_blocks(n, [&](auto nb, int64_t b) { scores_keys<P, R, decltype(nb)::value>(x, mt, kn, ld, b, scale, s); });
}
template <int R>
inline void scores_rows(const float* x, const float* mt, int64_t d, int64_t ld, int64_t n, float scale, float* s) {
  scores_keys_rows<Fp32Products, R>(x, mt, d, ld, n, scale, s);
}

// out[r * d + c] = sum_{j < n} w[r * ld + j] * m[j * d + c] (columns in chunks of 32).
template <int R>
inline void combine_rows(const float* w, int64_t ld, const float* m, int64_t n, int64_t d, float* out) {
  combine_block<Fp32Products, R>(w, ld, m, n, d, out);
}
#elif defined(HARMODT_AVX2)
// s[r * ld + 8 * (b0 + g) ...] = scale * sum_k x[r * d + k] * mt[k * ld + 8 * (b0 + g) ...], g < NB
// (R x NB accumulators: 12 of 16 registers at R = 6, NB = 2).
template <int R, int NB>
inline void scores_block(const float* x, const float* mt, int64_t d, int64_t ld, int64_t b0, float scale, float* s) {
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < NB; ++g) acc[r][g] = _mm256_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    __m256 m[NB];
    for (int g = 0; g < NB; ++g) m[g] = _mm256_loadu_ps(mt + k * ld + (b0 + g) * 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_set1_ps(x[r * d + k]);
      for (int g = 0; g < NB; ++g) acc[r][g] = _mm256_fmadd_ps(xr, m[g], acc[r][g]);
    }
  }
  const __m256 vs = _mm256_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < NB; ++g) _mm256_storeu_ps(s + r * ld + (b0 + g) * 8, _mm256_mul_ps(acc[r][g], vs));
}

template <int R>
inline void scores_rows(const float* x, const float* mt, int64_t d, int64_t ld, int64_t n, float scale, float* s) {
  const int64_t nb = (n + 7) / 8;  // (mt's columns are zero-padded to ld, a multiple of 16)
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) scores_block<R, 2>(x, mt, d, ld, b, scale, s);
  if (b < nb) scores_block<R, 1>(x, mt, d, ld, b, scale, s);
}

// out[r * d + c] = sum_{j < n} w[r * ld + j] * m[j * d + c] (columns in chunks of 16).
template <int R>
inline void combine_rows(const float* w, int64_t ld, const float* m, int64_t n, int64_t d, float* out) {
  for (int64_t c = 0; c < d; c += 16) {
    const __m256i l0 = tail8(d - c), l1 = tail8(d - c - 8);
    const bool full = d - c >= 16;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v0 = full ? _mm256_loadu_ps(m + j * d + c) : _mm256_maskload_ps(m + j * d + c, l0);
      const __m256 v1 = full ? _mm256_loadu_ps(m + j * d + c + 8) : _mm256_maskload_ps(m + j * d + c + 8, l1);
      for (int r = 0; r < R; ++r) {
        const __m256 wr = _mm256_set1_ps(w[r * ld + j]);
        acc[r][0] = _mm256_fmadd_ps(wr, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(wr, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (full) {  // (masked stores are slow on AMD Zen: only for a tail)
        _mm256_storeu_ps(out + r * d + c, acc[r][0]);
        _mm256_storeu_ps(out + r * d + c + 8, acc[r][1]);
      } else {
        _mm256_maskstore_ps(out + r * d + c, l0, acc[r][0]);
        _mm256_maskstore_ps(out + r * d + c + 8, l1, acc[r][1]);
      }
    }
  }
}
#else
template <int R>
inline void scores_rows(const float* x, const float* mt, int64_t d, int64_t ld, int64_t n, float scale, float* s) {
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < d; ++k) acc += x[r * d + k] * mt[k * ld + j];
      s[r * ld + j] = acc * scale;
    }
}

template <int R>
inline void combine_rows(const float* w, int64_t ld, const float* m, int64_t n, int64_t d, float* out) {
  for (int r = 0; r < R; ++r) {
    for (int64_t c = 0; c < d; ++c) out[r * d + c] = 0.0f;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < d; ++c) out[r * d + c] += w[r * ld + j] * m[j * d + c];
  }
}
#endif

// Calls f(std::integral_constant<int, R>{}) for the runtime row count rows (1..6), R = rows: the
// micro-kernels' row templates from a runtime count.
template <typename F>
inline void with_rows(int rows, F&& f) {
  switch (rows) {
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}
inline void scores_n(int rows, const float* x, const float* mt, int64_t d, int64_t ld, int64_t n, float scale, float* s) {
  with_rows(rows, [&](auto r) { scores_rows<decltype(r)::value>(x, mt, d, ld, n, scale, s); });
}
inline void combine_n(int rows, const float* w, int64_t ld, const float* m, int64_t n, int64_t d, float* out) {
  with_rows(rows, [&](auto r) { combine_rows<decltype(r)::value>(w, ld, m, n, d, out); });
}

// out[j * d + c] = sum_{i >= firstq[j0]} p[i * ld + j] * a[i * d + c] for the R keys j = j0 .. j0 + R - 1
// and c < d: the product p^T a ([keys][d], no transpose), R keys at once so each row of a is loaded
// once per R keys (2 loads + R broadcasts per 2 R FMAs). Rows before firstq[j0] see none of these
// keys (their p entries are zero) and are skipped.
template <int R>
inline void pt_times_a_block(const float* p, const float* a, int64_t i0, int64_t rows, int64_t ld, int64_t d, int64_t j0,
                             float* out) {
#if defined(__AVX512F__)
  pt_times_a_keys<Fp32Products, R>(p, a, i0, rows, ld, d, j0, out);
#elif defined(HARMODT_AVX2)
  for (int64_t c = 0; c < d; c += 16) {
    const __m256i l0 = tail8(d - c), l1 = tail8(d - c - 8);
    const bool full = d - c >= 16;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = i0; i < rows; ++i) {
      const __m256 v0 = full ? _mm256_loadu_ps(a + i * d + c) : _mm256_maskload_ps(a + i * d + c, l0);
      const __m256 v1 = full ? _mm256_loadu_ps(a + i * d + c + 8) : _mm256_maskload_ps(a + i * d + c + 8, l1);
      const float* pi = p + i * ld + j0;
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm256_set1_ps(pi[r]);
        acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (full) {
        _mm256_storeu_ps(out + (j0 + r) * d + c, acc[r][0]);
        _mm256_storeu_ps(out + (j0 + r) * d + c + 8, acc[r][1]);
      } else {
        _mm256_maskstore_ps(out + (j0 + r) * d + c, l0, acc[r][0]);
        _mm256_maskstore_ps(out + (j0 + r) * d + c + 8, l1, acc[r][1]);
      }
    }
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < d; ++c) {
      float acc = 0.0f;
      for (int64_t i = i0; i < rows; ++i) acc += p[i * ld + j0 + r] * a[i * d + c];
      out[(j0 + r) * d + c] = acc;
    }
#endif
}

// p^T a for keys 0 .. tk - 1 (see pt_times_a_block); firstq[j]: the first row that can see key j.
inline void pt_times_a(const float* p, const float* a, int64_t rows, int64_t ld, int64_t tk, int64_t d, const int64_t* firstq,
                       float* out) {
#if defined(__AVX512F__)
  constexpr int kKeys = 12;  // 24 accumulators for d = 32
#else
  constexpr int kKeys = 6;  // AVX2: 12 accumulators of 16 registers
#endif
  int64_t j = 0;
  for (; j + kKeys <= tk; j += kKeys) pt_times_a_block<kKeys>(p, a, firstq[j], rows, ld, d, j, out);
  for (; j + 4 <= tk; j += 4) pt_times_a_block<4>(p, a, firstq[j], rows, ld, d, j, out);
  for (; j < tk; ++j) pt_times_a_block<1>(p, a, firstq[j], rows, ld, d, j, out);
}

struct Problem {
  int64_t B, H, Tq, Tp, T, Tk, D;
  int64_t qkv_sb, qkv_st;                      // qkv (B, T, 3, H, D) contiguous: strides of b and t
  int64_t kp_sb, kp_sh, kp_st, vp_sb, vp_sh, vp_st;  // prefix strides (unit stride over D)
  const bool* valid;                           // key_valid (B, Tk), contiguous
  const float* bias;                           // qkv_bias (3 * H * D) fp32, added to every own token's q/k/v; or null
  const int64_t* qpos;                         // (Tq,)
  float scale;
  bool dropout;
  uint32_t threshold;  // keep iff 16-bit field >= threshold
  float inv_keep;      // 1 / (1 - p)
  uint64_t seed;
};

// Row b's key validity as 0/1 floats over ld columns (0 past Tk), read by softmax_row.
inline void validity_floats(const bool* valid, int64_t tk, int64_t ld, float* vis) {
  for (int64_t j = 0; j < ld; ++j) vis[j] = (j < tk && valid[j]) ? 1.0f : 0.0f;
}

// Softmax over the visible entries of s[0 .. n), n = qp + 1, in place (invisible -> 0), zero-filled
// up to ld. Key j is visible iff vis[j] != 0 or j == qp. If lse_in is given, s <- exp(s - lse_in)
// (the backward's recomputation of the normalized P); else s <- exp(s - max), *inv_l = 1 / sum
// (the caller folds the normalization into the row's output) and *lse_out the log-sum-exp.
inline void softmax_row(float* s, const float* vis, int64_t qp, int64_t ld, const float* lse_in, float* lse_out,
                        float* inv_l) {
  const int64_t n = qp + 1, np = round16(n);
  for (int64_t j = np; j < ld; ++j) s[j] = 0.0f;
#if defined(__AVX512F__)
  auto lanes_at = [&](int64_t j) {
    __mmask16 l = tail16(n - j) & _mm512_cmp_ps_mask(_mm512_loadu_ps(vis + j), _mm512_setzero_ps(), _CMP_NEQ_OQ);
    if (qp >= j && qp < j + 16) l |= static_cast<__mmask16>(1u << (qp - j));
    return l;
  };
  float m;
  if (lse_in != nullptr) {
    m = *lse_in;
  } else {
    __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 16) vm = _mm512_mask_max_ps(vm, lanes_at(j), vm, _mm512_loadu_ps(s + j));
    m = _mm512_reduce_max_ps(vm);
  }
  const __m512 vmx = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < np; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(lanes_at(j), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx)));
    _mm512_storeu_ps(s + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (lse_in == nullptr) {
    const float l = _mm512_reduce_add_ps(vsum);
    *inv_l = 1.0f / l;
    if (lse_out != nullptr) *lse_out = m + std::log(l);
  }
#elif defined(HARMODT_AVX2)
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vn = _mm256_set1_epi32(static_cast<int>(n)),
                vqp = _mm256_set1_epi32(static_cast<int>(qp));
  auto lanes_at = [&](int64_t j) {  // all-ones where key j + lane is visible
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), iota);
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vn, idx));
    const __m256 nz = _mm256_cmp_ps(_mm256_loadu_ps(vis + j), _mm256_setzero_ps(), _CMP_NEQ_OQ);
    return _mm256_or_ps(_mm256_and_ps(live, nz), _mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, vqp)));
  };
  float m;
  if (lse_in != nullptr) {
    m = *lse_in;
  } else {
    __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 8) vm = _mm256_blendv_ps(vm, _mm256_max_ps(vm, _mm256_loadu_ps(s + j)), lanes_at(j));
    m = hmax8(vm);
  }
  const __m256 vmx = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < np; j += 8) {
    const __m256 e = _mm256_and_ps(lanes_at(j), exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx)));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (lse_in == nullptr) {
    const float l = hsum8(vsum);
    *inv_l = 1.0f / l;
    if (lse_out != nullptr) *lse_out = m + std::log(l);
  }
#else
  auto visible = [&](int64_t j) { return j < n && (vis[j] != 0.0f || j == qp); };
  float m;
  if (lse_in != nullptr) {
    m = *lse_in;
  } else {
    m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j)
      if (visible(j)) m = std::max(m, s[j]);
  }
  float l = 0.0f;
  for (int64_t j = 0; j < np; ++j) {
    s[j] = visible(j) ? std::exp(s[j] - m) : 0.0f;
    l += s[j];
  }
  if (lse_in == nullptr) {
    *inv_l = 1.0f / l;
    if (lse_out != nullptr) *lse_out = m + std::log(l);
  }
#endif
}

// km[j] = inv_keep if element e0 + j is kept else 0, for j < n (dropout.cpp's keep mask); km must hold n
// rounded up to a multiple of 8 (the AVX2 path writes whole vectors).
inline void keep_row(uint64_t seed, uint32_t threshold, float inv_keep, int64_t e0, int64_t n, float* km) {
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
  if (threshold <= 0xFFFF) {
    // Element e0 + j is bit off + j of a stream of keep bits that starts at element 4 * (e0 / 4);
    // 8 draws give 32 bits, and a 64-bit window (two such words) serves 16 lanes at any offset.
    const __m512i thr = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
    const __m512 vk = _mm512_set1_ps(inv_keep);
    const int64_t blk0 = e0 >> 2, off = e0 & 3;
    auto word = [&](int64_t w) {  // keep bits 32 w .. 32 w + 31 of the stream
      return static_cast<uint64_t>(static_cast<uint32_t>(_mm512_cmpge_epu16_mask(splitmix8(seed, blk0 + 8 * w), thr)));
    };
    int64_t cur = -1;
    uint64_t window = 0;
    for (; j < n; j += 16) {
      const int64_t pos = off + j, w = pos >> 5;
      if (w == cur + 1 && cur >= 0) {
        window = (window >> 32) | (word(w + 1) << 32);
      } else if (w != cur) {
        window = word(w) | (word(w + 1) << 32);
      }
      cur = w;
      const __mmask16 live = tail16(n - j);
      const __mmask16 lanes = static_cast<__mmask16>(window >> (pos - 32 * w)) & live;
      _mm512_mask_storeu_ps(km + j, live, _mm512_maskz_mov_ps(lanes, vk));
    }
    return;
  }
#elif defined(HARMODT_AVX2)
  if (threshold <= 0xFFFF) {
    // The same stream of keep bits from element 4 * (e0 / 4), 16 per 4-lane hash (common.h's
    // keep_bits16); a 32-bit window of two such words serves 8 lanes at any offset.
    const __m256i thr = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
    const __m256 vk = _mm256_set1_ps(inv_keep);
    const int64_t blk0 = e0 >> 2, off = e0 & 3;
    int64_t cur = -2;
    uint32_t window = 0;  // bits 16 cur .. 16 cur + 31 of the stream
    for (; j < n; j += 8) {
      const int64_t pos = off + j, w = pos >> 4;
      if (w == cur + 1)
        window = (window >> 16) | (keep_bits16(seed, blk0 + 4 * (w + 1), thr) << 16);
      else if (w != cur)
        window = keep_bits16(seed, blk0 + 4 * w, thr) | (keep_bits16(seed, blk0 + 4 * (w + 1), thr) << 16);
      cur = w;
      const __m256 v = _mm256_and_ps(_mm256_castsi256_ps(bits8(window >> (pos - 16 * w))), vk);
      _mm256_storeu_ps(km + j, v);  // (past n: up to the next multiple of 8, within the caller's ld)
    }
    return;
  }
#endif
  while (j < n) {
    const int64_t e = e0 + j;
    const uint64_t h = splitmix(seed, static_cast<uint64_t>(e >> 2));
    for (int64_t q = e & 3; q < 4 && j < n; ++q, ++j)
      km[j] = static_cast<uint32_t>((h >> (16 * q)) & 0xFFFFu) >= threshold ? inv_keep : 0.0f;
  }
}

#if defined(__AVX512F__)
// dst[c * dst_stride + i] = src[i * src_stride + c] for i < 16, c < 16; source rows >= rows read as
// zeros (in-register 16 x 16 transpose: 32-bit and 64-bit unpacks, then two 128-bit lane shuffles).
inline void transpose16(const float* src, int64_t src_stride, int64_t rows, float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(src + i * src_stride) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // rows g..g+3: s[g + k] holds columns k, 4 + k, 8 + k, 12 + k
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 w_lo = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), w_hi = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 x_lo = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), x_hi = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    _mm512_storeu_ps(dst + k * dst_stride, _mm512_shuffle_f32x4(w_lo, x_lo, 0x88));
    _mm512_storeu_ps(dst + (8 + k) * dst_stride, _mm512_shuffle_f32x4(w_lo, x_lo, 0xDD));
    _mm512_storeu_ps(dst + (4 + k) * dst_stride, _mm512_shuffle_f32x4(w_hi, x_hi, 0x88));
    _mm512_storeu_ps(dst + (12 + k) * dst_stride, _mm512_shuffle_f32x4(w_hi, x_hi, 0xDD));
  }
}
#endif

// mt[c * ld + j] = m[j * d + c] for c < d, j < ld (rows j >= tk are zero).
inline void transpose_keys(const float* m, int64_t tk, int64_t d, int64_t ld, float* mt) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    for (int64_t j = 0; j < ld; j += 16)
      for (int64_t c = 0; c < d; c += 16) transpose16(m + j * d + c, d, std::max<int64_t>(0, std::min<int64_t>(16, tk - j)), mt + c * ld + j, ld);
    return;
  }
#elif defined(HARMODT_AVX2)
  if (d % 8 == 0) {  // 8 x 8 blocks through registers (ld is a multiple of 16)
    for (int64_t j = 0; j < ld; j += 8)
      for (int64_t c = 0; c < d; c += 8) {
        __m256 r[8];
        for (int64_t i = 0; i < 8; ++i) r[i] = j + i < tk ? _mm256_loadu_ps(m + (j + i) * d + c) : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(mt + (c + i) * ld + j, r[i]);
      }
    return;
  }
#endif
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t j = 0; j < tk; ++j) mt[c * ld + j] = m[j * d + c];
    for (int64_t j = tk; j < ld; ++j) mt[c * ld + j] = 0.0f;
  }
}

// The softmax backward of one row (n keys, ld columns): with km (dropout multipliers) given,
// dp <- dp * km and p <- p * km after use; ds = scale * p * (dp - sum_j p_j dp_j), zero past n.
inline void softmax_grad_row(float* p, float* dp, const float* km, int64_t n, int64_t ld, float scale, float* ds) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = tail16(n - j);
    __m512 g = _mm512_maskz_loadu_ps(live, dp + j);
    if (km != nullptr) g = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(live, km + j));
    _mm512_mask_storeu_ps(dp + j, live, g);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, p + j), g, acc);
  }
  const __m512 di = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), vs = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < ld; j += 16) {
    const __mmask16 live = j < n ? tail16(n - j) : __mmask16(0);
    const __m512 pv = _mm512_maskz_loadu_ps(live, p + j);
    _mm512_storeu_ps(ds + j, _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_maskz_loadu_ps(live, dp + j), di)), vs));
    if (km != nullptr && live) _mm512_mask_storeu_ps(p + j, live, _mm512_mul_ps(pv, _mm512_maskz_loadu_ps(live, km + j)));
  }
#elif defined(HARMODT_AVX2)
  // Whole vectors, no lane masks (masked stores are slow on AMD Zen): p is exactly 0 past n
  // (softmax_row) and dp and km hold finite values there, so those lanes add 0 to the sum and get
  // ds = 0 and p = 0, as the masked form would give.
  const int64_t n8 = (n + 7) / 8 * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    __m256 g = _mm256_loadu_ps(dp + j);
    if (km != nullptr) g = _mm256_mul_ps(g, _mm256_loadu_ps(km + j));
    _mm256_storeu_ps(dp + j, g);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), g, acc);
  }
  const __m256 di = _mm256_set1_ps(hsum8(acc)), vs = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < ld; j += 8) {
    const __m256 pv = _mm256_loadu_ps(p + j);
    if (j < n8) {
      _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(dp + j), di)), vs));
      if (km != nullptr) _mm256_storeu_ps(p + j, _mm256_mul_ps(pv, _mm256_loadu_ps(km + j)));
    } else {
      _mm256_storeu_ps(ds + j, _mm256_setzero_ps());
    }
  }
#else
  float di = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float g = km != nullptr ? dp[j] * km[j] : dp[j];
    dp[j] = g;
    di += p[j] * g;
  }
  for (int64_t j = 0; j < n; ++j) {
    ds[j] = p[j] * (dp[j] - di) * scale;
    if (km != nullptr) p[j] *= km[j];
  }
  for (int64_t j = n; j < ld; ++j) ds[j] = 0.0f;
#endif
}

#if defined(HARMODT_AVX512_BF16_STORE)
// ---- bf16 inputs: the five products on AVX512-BF16 dot products (vdpbf16ps) ----
//
// With bf16 q/k/v (the bf16 training step), the products q.k, P v (and in the backward dO.v, dS k,
// drop(P)^T dO, dS^T q) take bf16 operands in pairs along their sum and add in fp32: q, k and v
// after the bias, P after dropout (unnormalized, as the fp32 path folds 1 / sum in at the end) and
// dS are rounded to bf16 once, as a bf16 autocast matmul would round them. The softmax, its
// gradient, the log-sum-exp and the dropout mask stay fp32 and are the fp32 path's own code.
// A pair word holds two bf16: the first in its low half (a row of bf16 read as 32-bit words).

inline __mmask16 lanes16(int64_t left) {
  return left <= 0 ? __mmask16(0) : left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}
inline __m256i to_bf16(__m512 v) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  return reinterpret_cast<const __m256i&>(h);
}

// out[t] = (x[2t], x[2t + 1]) rounded to bf16, t < words (a multiple of 16); x[j] for j >= n reads as 0.
inline void row_pairs(const float* x, int64_t n, int64_t words, uint32_t* out) {
  for (int64_t t = 0; t < words; t += 16) {
    const int64_t j = 2 * t;
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(lanes16(n - j - 16), x + j + 16), _mm512_maskz_loadu_ps(lanes16(n - j), x + j));
    _mm512_storeu_si512(out + t, reinterpret_cast<const __m512i&>(v));
  }
}
// out[j] = (x0[j], x1[j]) rounded to bf16 for j < n (x1 null: zeros); out is written up to n
// rounded to 16 (zeros past n).
inline void interleave_rows(const float* x0, const float* x1, int64_t n, uint32_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(n - j);
    const __m512i lo = _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m, x0 + j)));
    const __m512i hi = x1 == nullptr ? _mm512_setzero_si512() : _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m, x1 + j)));
    _mm512_storeu_si512(out + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// The products' operands as bf16 pair words (see Fp32Products).
struct Bf16Products {
  using W = uint32_t;
  static __m512bh bcast(uint32_t w) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(w)); }
  static __m512bh load(__mmask16 m, const uint32_t* p) { return (__m512bh)_mm512_maskz_loadu_epi32(m, p); }
  static __m512bh load(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512 madd(__m512 acc, __m512bh w, __m512bh v) { return _mm512_dpbf16_ps(acc, w, v); }
};

// With Bf16Products: scores_keys sums dw pair words per row against mt [dw][ld] (the keys' pair
// words, transposed); combine_block and pt_times_a_keys sum pair words along keys or query rows
// against pair words of two rows of m or a (d a multiple of 32).

// ... for keys 0 .. tk - 1; firstq[j]: the first query row that can see key j (its pair: firstq / 2).
inline void pt_times_a_bf16(const uint32_t* p, const uint32_t* a, int64_t np, int64_t ld, int64_t tk, int64_t d, const int64_t* firstq,
                            float* out) {
  int64_t j = 0;
  for (; j + 12 <= tk; j += 12) pt_times_a_keys<Bf16Products, 12>(p, a, firstq[j] / 2, np, ld, d, j, out);
  for (; j + 4 <= tk; j += 4) pt_times_a_keys<Bf16Products, 4>(p, a, firstq[j] / 2, np, ld, d, j, out);
  for (; j < tk; ++j) pt_times_a_keys<Bf16Products, 1>(p, a, firstq[j] / 2, np, ld, d, j, out);
}

inline void scores_n_bf16(int rows, const uint32_t* x, const uint32_t* mt, int64_t dw, int64_t ld, int64_t n, float scale, float* s) {
  with_rows(rows, [&](auto r) { scores_keys_rows<Bf16Products, decltype(r)::value>(x, mt, dw, ld, n, scale, s); });
}
inline void combine_n_bf16(int rows, const uint32_t* w, int64_t ldw, const uint32_t* m, int64_t np, int64_t d, float* out) {
  with_rows(rows, [&](auto r) { combine_block<Bf16Products, decltype(r)::value>(w, ldw, m, np, d, out); });
}

// The pair-word forms of one head's keys or values m [Tk][D] (fp32, bias added): transposed,
// mt [D / 2][ld] (word (c, j) = (m[j][2c], m[j][2c + 1]); zero columns past Tk), for the
// products summed over D; or by key pairs, mp [ld / 2][D] (word (t, c) = (m[2t][c], m[2t + 1][c]);
// zero rows past Tk), for the products summed over keys. tmp: Tk * D / 2 words.
inline void pairs_over_d(const float* m, int64_t tk, int64_t d, int64_t ld, uint32_t* tmp, uint32_t* mt) {
  for (int64_t j = 0; j < tk; ++j) row_pairs(m + j * d, d, d / 2, tmp + j * (d / 2));
  transpose_keys(reinterpret_cast<const float*>(tmp), tk, d / 2, ld, reinterpret_cast<float*>(mt));  // (moves bits only)
}
inline void pairs_over_keys(const float* m, int64_t tk, int64_t d, int64_t ld, uint32_t* mp) {
  for (int64_t t = 0; t < ld / 2; ++t) {
    if (2 * t < tk)
      interleave_rows(m + 2 * t * d, 2 * t + 1 < tk ? m + (2 * t + 1) * d : nullptr, d, mp + t * d);
    else
      std::fill(mp + t * d, mp + (t + 1) * d, 0u);
  }
}
#endif

// Loads batch row b's keys and values of every head (prefix, then own) into fp32 buffers, reading
// the packed qkv rows in memory order: kk/vv [H][Tk][D] and their transposes kt/vt [H][D][ld]
// (zero-padded columns; each only if asked), and the queries of all own tokens qq [T][H][D]. With
// pr.bias, the own tokens' q/k/v get it added after widening (the projection's bias, kept out of
// its GEMM: one pass over the (BT, 3C) output fewer).
template <typename T>
void load_keys(const Problem& pr, const T* qkv, const T* kp, const T* vp, int64_t b, float* qq, float* kk, float* vv,
               float* kt, float* vt, int64_t ld) {
  const int64_t D = pr.D, H = pr.H, hs = pr.Tk * D;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < pr.Tp; ++j) {
      load_row(kp + b * pr.kp_sb + h * pr.kp_sh + j * pr.kp_st, D, kk + h * hs + j * D);
      load_row(vp + b * pr.vp_sb + h * pr.vp_sh + j * pr.vp_st, D, vv + h * hs + j * D);
    }
  for (int64_t j = pr.Tp; j < pr.Tk; ++j) {
    const T* row = qkv + b * pr.qkv_sb + (j - pr.Tp) * pr.qkv_st;  // [3][H][D]
    const float* bq = pr.bias;  // (the projection's bias of q, then k, then v, or none)
    load_row(row, H * D, qq + (j - pr.Tp) * H * D, bq);  // qq [T][H][D]
    for (int64_t h = 0; h < H; ++h) {
      load_row(row + (H + h) * D, D, kk + h * hs + j * D, bq == nullptr ? nullptr : bq + (H + h) * D);
      load_row(row + (2 * H + h) * D, D, vv + h * hs + j * D, bq == nullptr ? nullptr : bq + (2 * H + h) * D);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    if (kt != nullptr) transpose_keys(kk + h * hs, pr.Tk, D, ld, kt + h * D * ld);
    if (vt != nullptr) transpose_keys(vv + h * hs, pr.Tk, D, ld, vt + h * D * ld);
  }
}

// Prefetches part `part` of `parts` of the bytes at p into L2 (the next batch row's block is fetched
// while the current one's heads are computed).
inline void prefetch_part(const void* p, int64_t bytes, int64_t part, int64_t parts) {
#if defined(__AVX512F__) || defined(HARMODT_AVX2)
  const char* base = static_cast<const char*>(p);
  const int64_t lo = bytes * part / parts, hi = bytes * (part + 1) / parts;
  for (int64_t o = lo; o < hi; o += 64) _mm_prefetch(base + o, _MM_HINT_T1);
#endif
}
// ... of batch row b's packed q/k/v block
template <typename T>
inline void prefetch_row_part(const Problem& pr, const T* qkv, int64_t b, int64_t part, int64_t parts) {
  prefetch_part(qkv + b * pr.qkv_sb, pr.T * pr.qkv_st * static_cast<int64_t>(sizeof(T)), part, parts);
}

constexpr int kRows = 6;  // query rows per micro-kernel call (6 measured 15-25 % faster than 4 in the backward; 8 no better)

#if defined(HARMODT_AVX512_BF16_STORE)
// The forward with bf16 q/k/v on the dot-product kernels above (see there for what is rounded).
void forward_bf16(const Problem& pr, const c10::BFloat16* qkv, const c10::BFloat16* kp, const c10::BFloat16* vp, c10::BFloat16* out,
                  float* lse) {
  const int64_t D = pr.D, DW = D / 2, ld = round16(pr.Tk), H = pr.H, hs = pr.Tk * D;
  at::parallel_for(0, pr.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qq(pr.T * H * D), kk(H * hs), vv(H * hs), s(kRows * ld), vis(ld), km(ld), o(kRows * D);
    std::vector<uint32_t> kt(H * DW * ld), vpair(H * (ld / 2) * D), tmp(pr.Tk * DW), qw(kRows * DW), pw(kRows * ld);
    for (int64_t pair = b0 * H; pair < b1 * H; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      if (h == 0) {
        load_keys(pr, qkv, kp, vp, b, qq.data(), kk.data(), vv.data(), nullptr, nullptr, ld);
        for (int64_t g = 0; g < H; ++g) {
          pairs_over_d(kk.data() + g * hs, pr.Tk, D, ld, tmp.data(), kt.data() + g * DW * ld);
          pairs_over_keys(vv.data() + g * hs, pr.Tk, D, ld, vpair.data() + g * (ld / 2) * D);
        }
        validity_floats(pr.valid + b * pr.Tk, pr.Tk, ld, vis.data());
      }
      if (b + 1 < b1) prefetch_row_part(pr, qkv, b + 1, h, H);
      for (int64_t i0 = 0; i0 < pr.Tq; i0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, pr.Tq - i0));
        int64_t n_max = 0;
        for (int r = 0; r < rows; ++r) {
          const int64_t qp = pr.qpos[i0 + r];
          n_max = std::max(n_max, qp + 1);
          row_pairs(qq.data() + ((qp - pr.Tp) * H + h) * D, D, DW, qw.data() + r * DW);
        }
        scores_n_bf16(rows, qw.data(), kt.data() + h * DW * ld, DW, ld, n_max, pr.scale, s.data());
        float inv_l[kRows];
        const int64_t np = (n_max + 1) / 2;
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, qp = pr.qpos[i], n = qp + 1;
          float* sr = s.data() + r * ld;
          softmax_row(sr, vis.data(), qp, ld, nullptr, lse == nullptr ? nullptr : lse + pair * pr.Tq + i, &inv_l[r]);
          if (pr.dropout) {
            keep_row(pr.seed, pr.threshold, pr.inv_keep, (pair * pr.Tq + i) * pr.Tk, n, km.data());
            for (int64_t j = 0; j < n; ++j) sr[j] *= km[j];
          }
          row_pairs(sr, ld, round16(np), pw.data() + r * ld);
        }
        combine_n_bf16(rows, pw.data(), ld, vpair.data() + h * (ld / 2) * D, np, D, o.data());  // unnormalized: scaled by 1 / sum below
        for (int r = 0; r < rows; ++r) {
          float* orow = o.data() + r * D;
          for (int64_t c = 0; c < D; ++c) orow[c] *= inv_l[r];
          store_row(orow, D, out + (b * pr.Tq + i0 + r) * pr.H * D + h * D);
        }
      }
    }
  });
}

// The backward with bf16 q/k/v and output gradient on the dot-product kernels (firstq: as in
// backward_impl).
void backward_bf16(const Problem& pr, const c10::BFloat16* qkv, const c10::BFloat16* kp, const c10::BFloat16* vp,
                   const c10::BFloat16* gout, const float* lse, c10::BFloat16* dqkv, const int64_t* firstq) {
  const int64_t D = pr.D, DW = D / 2, ld = round16(pr.Tk), Tq = pr.Tq, T2 = (Tq + 1) / 2;
  const int64_t H = pr.H, hs = pr.Tk * D;
  at::parallel_for(0, pr.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qq(pr.T * H * D), kk(H * hs), vv(H * hs), qs(Tq * D), go(H * Tq * D), pd(Tq * ld), ds(Tq * ld),
        dp(kRows * ld), vis(ld), km(ld), dq(kRows * D), dk(ld * D), dv(ld * D);
    std::vector<uint32_t> kt(H * DW * ld), vt(H * DW * ld), kpair(H * (ld / 2) * D), tmp(pr.Tk * DW), qw(kRows * DW),
        dow(kRows * DW), dsw(kRows * ld), pt(T2 * ld), dst(T2 * ld), qsp(T2 * D), dop(T2 * D);
    for (int64_t pair = b0 * H; pair < b1 * H; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      if (h == 0) {
        load_keys(pr, qkv, kp, vp, b, qq.data(), kk.data(), vv.data(), nullptr, nullptr, ld);
        for (int64_t g = 0; g < H; ++g) {
          pairs_over_d(kk.data() + g * hs, pr.Tk, D, ld, tmp.data(), kt.data() + g * DW * ld);
          pairs_over_d(vv.data() + g * hs, pr.Tk, D, ld, tmp.data(), vt.data() + g * DW * ld);
          pairs_over_keys(kk.data() + g * hs, pr.Tk, D, ld, kpair.data() + g * (ld / 2) * D);
        }
        validity_floats(pr.valid + b * pr.Tk, pr.Tk, ld, vis.data());
        for (int64_t i = 0; i < Tq; ++i)  // the row's output gradient in memory order, as go [H][Tq][D]
          for (int64_t g = 0; g < H; ++g) load_row(gout + ((b * Tq + i) * H + g) * D, D, go.data() + (g * Tq + i) * D);
      }
      const float* dos = go.data() + h * Tq * D;  // [Tq][D]
      if (b + 1 < b1) {
        prefetch_row_part(pr, qkv, b + 1, h, H);
        prefetch_part(gout + (b + 1) * Tq * H * D, Tq * H * D * static_cast<int64_t>(sizeof(c10::BFloat16)), h, H);
      }
      for (int64_t i0 = 0; i0 < Tq; i0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, Tq - i0));
        int64_t n_max = 0;
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, qp = pr.qpos[i];
          n_max = std::max(n_max, qp + 1);
          std::memcpy(qs.data() + i * D, qq.data() + ((qp - pr.Tp) * H + h) * D, D * sizeof(float));
          row_pairs(qs.data() + i * D, D, DW, qw.data() + r * DW);
          row_pairs(dos + i * D, D, DW, dow.data() + r * DW);
        }
        float* p4 = pd.data() + i0 * ld;  // P, then drop(P), of these rows
        float* ds4 = ds.data() + i0 * ld;
        scores_n_bf16(rows, qw.data(), kt.data() + h * DW * ld, DW, ld, n_max, pr.scale, p4);
        scores_n_bf16(rows, dow.data(), vt.data() + h * DW * ld, DW, ld, n_max, 1.0f, dp.data());  // dO . v_j
        const int64_t np = (n_max + 1) / 2;
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, qp = pr.qpos[i], n = qp + 1;
          float* pr_ = p4 + r * ld;
          softmax_row(pr_, vis.data(), qp, ld, lse + pair * Tq + i, nullptr, nullptr);  // P, zero past n
          if (pr.dropout) keep_row(pr.seed, pr.threshold, pr.inv_keep, (pair * Tq + i) * pr.Tk, n, km.data());
          softmax_grad_row(pr_, dp.data() + r * ld, pr.dropout ? km.data() : nullptr, n, ld, pr.scale, ds4 + r * ld);
          row_pairs(ds4 + r * ld, ld, round16(np), dsw.data() + r * ld);
        }
        combine_n_bf16(rows, dsw.data(), ld, kpair.data() + h * (ld / 2) * D, np, D, dq.data());  // dq_i = scale * sum_j dS_ij k_j
        for (int r = 0; r < rows; ++r)
          store_row(dq.data() + r * D, D, dqkv + b * pr.qkv_sb + (pr.qpos[i0 + r] - pr.Tp) * pr.qkv_st + h * D);
      }
      for (int64_t t = 0; t < T2; ++t) {  // row pairs of drop(P), dS, dO and q, for the sums over the queries
        const bool two = 2 * t + 1 < Tq;
        interleave_rows(pd.data() + 2 * t * ld, two ? pd.data() + (2 * t + 1) * ld : nullptr, ld, pt.data() + t * ld);
        interleave_rows(ds.data() + 2 * t * ld, two ? ds.data() + (2 * t + 1) * ld : nullptr, ld, dst.data() + t * ld);
        interleave_rows(dos + 2 * t * D, two ? dos + (2 * t + 1) * D : nullptr, D, dop.data() + t * D);
        interleave_rows(qs.data() + 2 * t * D, two ? qs.data() + (2 * t + 1) * D : nullptr, D, qsp.data() + t * D);
      }
      pt_times_a_bf16(pt.data(), dop.data(), T2, ld, pr.Tk, D, firstq, dv.data());   // dV = drop(P)^T dO  [Tk][D]
      pt_times_a_bf16(dst.data(), qsp.data(), T2, ld, pr.Tk, D, firstq, dk.data());  // dK = dS^T Q (scale folded in)
      for (int64_t j = pr.Tp; j < pr.Tk; ++j) {
        c10::BFloat16* dst_row = dqkv + b * pr.qkv_sb + (j - pr.Tp) * pr.qkv_st + h * D;
        store_row(dk.data() + j * D, D, dst_row + pr.H * D);
        store_row(dv.data() + j * D, D, dst_row + 2 * pr.H * D);
      }
    }
  });
}

// Whether bf16 q/k/v take the dot-product kernels: a head size that is a multiple of 32 (whole pair
// vectors) on a CPU with AVX512-BF16.
inline bool bf16_products(const Problem& pr) { return pr.D % 32 == 0 && bf16_gemm_available(); }
#endif

template <typename T>
void forward_impl(const Problem& pr, const T* qkv, const T* kp, const T* vp, T* out, float* lse) {
#if defined(HARMODT_AVX512_BF16_STORE)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (bf16_products(pr)) return forward_bf16(pr, qkv, kp, vp, out, lse);
#endif
  const int64_t D = pr.D, ld = round16(pr.Tk);
  const int64_t H = pr.H, hs = pr.Tk * D;
  at::parallel_for(0, pr.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qq(pr.T * H * D), kk_(H * hs), vv_(H * hs), kt_(H * D * ld), q(kRows * D), s(kRows * ld),
        vis(ld), km(ld), o(kRows * D);
    for (int64_t pair = b0 * H; pair < b1 * H; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      if (h == 0) load_keys(pr, qkv, kp, vp, b, qq.data(), kk_.data(), vv_.data(), kt_.data(), nullptr, ld);
      const float* vv = vv_.data() + h * hs;
      const float* kt = kt_.data() + h * D * ld;
      if (h == 0) validity_floats(pr.valid + b * pr.Tk, pr.Tk, ld, vis.data());
      if (b + 1 < b1) prefetch_row_part(pr, qkv, b + 1, h, H);
      for (int64_t i0 = 0; i0 < pr.Tq; i0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, pr.Tq - i0));
        int64_t n_max = 0;
        for (int r = 0; r < rows; ++r) {
          const int64_t qp = pr.qpos[i0 + r];
          n_max = std::max(n_max, qp + 1);
          std::memcpy(q.data() + r * D, qq.data() + ((qp - pr.Tp) * H + h) * D, D * sizeof(float));
        }
        scores_n(rows, q.data(), kt, D, ld, n_max, pr.scale, s.data());
        float inv_l[kRows];
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, qp = pr.qpos[i], n = qp + 1;
          float* sr = s.data() + r * ld;
          softmax_row(sr, vis.data(), qp, ld, nullptr, lse == nullptr ? nullptr : lse + pair * pr.Tq + i, &inv_l[r]);
          if (pr.dropout) {
            keep_row(pr.seed, pr.threshold, pr.inv_keep, (pair * pr.Tq + i) * pr.Tk, n, km.data());
            for (int64_t j = 0; j < n; ++j) sr[j] *= km[j];
          }
        }
        combine_n(rows, s.data(), ld, vv, n_max, D, o.data());  // unnormalized: scaled by 1 / sum below
        for (int r = 0; r < rows; ++r) {
          float* orow = o.data() + r * D;
          for (int64_t c = 0; c < D; ++c) orow[c] *= inv_l[r];
          store_row(orow, D, out + (b * pr.Tq + i0 + r) * pr.H * D + h * D);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const Problem& pr, const T* qkv, const T* kp, const T* vp, const T* gout, const float* lse, T* dqkv) {
  const int64_t D = pr.D, ld = round16(pr.Tk), Tq = pr.Tq;
  const int64_t H = pr.H, hs = pr.Tk * D;
  // first[b]: with ascending query positions, the queries before it see no key of column block b.
  // firstq[j]: with ascending query positions, the queries before it do not see key j.
  std::vector<int64_t> firstq(pr.Tk, 0);
  bool ascending = true;
  for (int64_t i = 1; i < Tq; ++i) ascending = ascending && pr.qpos[i] >= pr.qpos[i - 1];
  if (ascending)
    for (int64_t j = 0; j < pr.Tk; ++j) {
      firstq[j] = j > 0 ? firstq[j - 1] : 0;
      while (firstq[j] < Tq && pr.qpos[firstq[j]] < j) ++firstq[j];
    }
#if defined(HARMODT_AVX512_BF16_STORE)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (bf16_products(pr)) return backward_bf16(pr, qkv, kp, vp, gout, lse, dqkv, firstq.data());
#endif
  at::parallel_for(0, pr.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qq(pr.T * H * D), kk_(H * hs), vv_(H * hs), kt_(H * D * ld), vt_(H * D * ld), qs(Tq * D), go(H * Tq * D),
        pd(Tq * ld), ds(Tq * ld), dp(kRows * ld), vis(ld), km(ld), dq(kRows * D), dk(ld * D), dv(ld * D);
    for (int64_t pair = b0 * H; pair < b1 * H; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      if (h == 0) load_keys(pr, qkv, kp, vp, b, qq.data(), kk_.data(), vv_.data(), kt_.data(), vt_.data(), ld);
      const float* kk = kk_.data() + h * hs;
      const float* kt = kt_.data() + h * D * ld;
      const float* vt = vt_.data() + h * D * ld;
      if (h == 0) {
        validity_floats(pr.valid + b * pr.Tk, pr.Tk, ld, vis.data());
        for (int64_t i = 0; i < Tq; ++i)  // the row's output gradient in memory order, as go [H][Tq][D]
          for (int64_t g = 0; g < H; ++g) load_row(gout + ((b * Tq + i) * H + g) * D, D, go.data() + (g * Tq + i) * D);
      }
      const float* dos = go.data() + h * Tq * D;  // [Tq][D]
      if (b + 1 < b1) {
        prefetch_row_part(pr, qkv, b + 1, h, H);
        prefetch_part(gout + (b + 1) * Tq * H * D, Tq * H * D * static_cast<int64_t>(sizeof(T)), h, H);
      }
      for (int64_t i0 = 0; i0 < Tq; i0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, Tq - i0));
        int64_t n_max = 0;
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, qp = pr.qpos[i];
          n_max = std::max(n_max, qp + 1);
          std::memcpy(qs.data() + i * D, qq.data() + ((qp - pr.Tp) * H + h) * D, D * sizeof(float));
        }
        float* p4 = pd.data() + i0 * ld;  // P, then drop(P), of these rows
        float* ds4 = ds.data() + i0 * ld;
        scores_n(rows, qs.data() + i0 * D, kt, D, ld, n_max, pr.scale, p4);
        scores_n(rows, dos + i0 * D, vt, D, ld, n_max, 1.0f, dp.data());  // dO . v_j
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, qp = pr.qpos[i], n = qp + 1;
          float* pr_ = p4 + r * ld;
          float* dpr = dp.data() + r * ld;
          float* dsr = ds4 + r * ld;
          softmax_row(pr_, vis.data(), qp, ld, lse + pair * Tq + i, nullptr, nullptr);  // P, zero past n
          if (pr.dropout) keep_row(pr.seed, pr.threshold, pr.inv_keep, (pair * Tq + i) * pr.Tk, n, km.data());
          softmax_grad_row(pr_, dpr, pr.dropout ? km.data() : nullptr, n, ld, pr.scale, dsr);
        }
        combine_n(rows, ds4, ld, kk, n_max, D, dq.data());  // dq_i = scale * sum_j dS_ij k_j
        for (int r = 0; r < rows; ++r)
          store_row(dq.data() + r * D, D, dqkv + b * pr.qkv_sb + (pr.qpos[i0 + r] - pr.Tp) * pr.qkv_st + h * D);
      }
      pt_times_a(pd.data(), dos, Tq, ld, pr.Tk, D, firstq.data(), dv.data());  // dV = drop(P)^T dO  [Tk][D]
      pt_times_a(ds.data(), qs.data(), Tq, ld, pr.Tk, D, firstq.data(), dk.data());   // dK = dS^T Q (scale folded in)
      for (int64_t j = pr.Tp; j < pr.Tk; ++j) {
        T* dst = dqkv + b * pr.qkv_sb + (j - pr.Tp) * pr.qkv_st + h * D;
        store_row(dk.data() + j * D, D, dst + pr.H * D);
        store_row(dv.data() + j * D, D, dst + 2 * pr.H * D);
      }
    }
  });
}

Problem make_problem(const at::Tensor& qkv, const std::optional<at::Tensor>& k_prefix,
                     const std::optional<at::Tensor>& v_prefix, const at::Tensor& key_valid,
                     const at::Tensor& query_pos, double p, int64_t seed, const std::optional<at::Tensor>& qkv_bias,
                     const char* op) {
  TORCH_CHECK_VALUE(qkv.device().is_cpu(), op, ": qkv must be a CPU tensor");
  TORCH_CHECK_VALUE(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must be (B, T, 3, H, D), got ", qkv.sizes());
  TORCH_CHECK_VALUE(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, op,
                    ": qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK_VALUE(qkv.is_contiguous(), op, ": qkv must be contiguous");
  Problem pr{};
  pr.B = qkv.size(0);
  pr.T = qkv.size(1);
  pr.H = qkv.size(3);
  pr.D = qkv.size(4);
  pr.qkv_sb = qkv.stride(0);
  pr.qkv_st = qkv.stride(1);
  const bool has_prefix = k_prefix.has_value() && k_prefix->defined();
  TORCH_CHECK_VALUE(has_prefix == (v_prefix.has_value() && v_prefix->defined()), op,
                    ": give both prefix keys and values or neither");
  pr.Tp = 0;
  if (has_prefix) {
    for (const at::Tensor* t : {&*k_prefix, &*v_prefix}) {
      TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == pr.B && t->size(1) == pr.H && t->size(3) == pr.D, op,
                        ": prefix keys/values must be (", pr.B, ", ", pr.H, ", Tp, ", pr.D, "), got ", t->sizes());
      TORCH_CHECK_VALUE(t->size(2) == k_prefix->size(2), op, ": prefix keys and values differ in length");
      TORCH_CHECK_VALUE(t->scalar_type() == qkv.scalar_type(), op, ": prefix is ", t->scalar_type(), " but qkv is ",
                        qkv.scalar_type());
      TORCH_CHECK_VALUE(t->stride(3) == 1, op, ": prefix keys/values need unit stride over D");
    }
    pr.Tp = k_prefix->size(2);
    pr.kp_sb = k_prefix->stride(0);
    pr.kp_sh = k_prefix->stride(1);
    pr.kp_st = k_prefix->stride(2);
    pr.vp_sb = v_prefix->stride(0);
    pr.vp_sh = v_prefix->stride(1);
    pr.vp_st = v_prefix->stride(2);
  }
  pr.Tk = pr.Tp + pr.T;
  TORCH_CHECK_VALUE(key_valid.scalar_type() == at::kBool && key_valid.dim() == 2 && key_valid.size(0) == pr.B &&
                        key_valid.size(1) == pr.Tk && key_valid.is_contiguous(),
                    op, ": key_valid must be contiguous bool (", pr.B, ", ", pr.Tk, "), got ", key_valid.sizes(), " ",
                    key_valid.scalar_type());
  TORCH_CHECK_VALUE(query_pos.scalar_type() == at::kLong && query_pos.dim() == 1 && query_pos.is_contiguous(), op,
                    ": query_pos must be contiguous int64 (Tq,)");
  pr.Tq = query_pos.size(0);
  const int64_t* qp = query_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pr.Tq; ++i)
    TORCH_CHECK_VALUE(qp[i] >= pr.Tp && qp[i] < pr.Tk, op, ": query_pos[", i, "] = ", qp[i],
                      " is not an own token (must be in [", pr.Tp, ", ", pr.Tk, "))");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout p must be in [0, 1), got ", p);
  pr.valid = key_valid.data_ptr<bool>();
  pr.bias = nullptr;
  if (qkv_bias.has_value() && qkv_bias->defined()) {
    const at::Tensor& qb = *qkv_bias;
    TORCH_CHECK_VALUE(qb.device().is_cpu() && qb.scalar_type() == at::kFloat && qb.dim() == 1 &&
                          qb.size(0) == 3 * pr.H * pr.D && qb.is_contiguous(),
                      op, ": qkv_bias must be a contiguous float32 CPU tensor of shape (", 3 * pr.H * pr.D, ",), got ",
                      qb.sizes(), " ", qb.scalar_type());
    pr.bias = qb.data_ptr<float>();
  }
  pr.qpos = qp;
  pr.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(pr.D)));
  pr.dropout = p > 0.0;
  pr.threshold = static_cast<uint32_t>(std::llround(p * 65536.0));
  pr.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  pr.seed = static_cast<uint64_t>(seed);
  return pr;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv, const std::optional<at::Tensor>& k_prefix,
                                                     const std::optional<at::Tensor>& v_prefix,
                                                     const at::Tensor& key_valid, const at::Tensor& query_pos, double p,
                                                     int64_t seed, bool need_lse, const std::optional<at::Tensor>& qkv_bias) {
  const Problem pr = make_problem(qkv, k_prefix, v_prefix, key_valid, query_pos, p, seed, qkv_bias, "attention_forward");
  at::Tensor out = at::empty({pr.B, pr.Tq, pr.H * pr.D}, qkv.options());
  at::Tensor lse = need_lse ? at::empty({pr.B, pr.H, pr.Tq}, qkv.options().dtype(at::kFloat)) : at::Tensor();
  if (out.numel() == 0) return {out, lse};
  float* lp = need_lse ? lse.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "attention_forward", [&] {
    const scalar_t* kp = pr.Tp > 0 ? k_prefix->data_ptr<scalar_t>() : nullptr;
    const scalar_t* vp = pr.Tp > 0 ? v_prefix->data_ptr<scalar_t>() : nullptr;
    forward_impl<scalar_t>(pr, qkv.data_ptr<scalar_t>(), kp, vp, out.data_ptr<scalar_t>(), lp);
  });
  return {out, lse};
}

at::Tensor attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const std::optional<at::Tensor>& k_prefix,
                              const std::optional<at::Tensor>& v_prefix, const at::Tensor& key_valid,
                              const at::Tensor& query_pos, const at::Tensor& lse, double p, int64_t seed,
                              const std::optional<at::Tensor>& qkv_bias) {
  const Problem pr = make_problem(qkv, k_prefix, v_prefix, key_valid, query_pos, p, seed, qkv_bias, "attention_backward");
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == pr.B && grad_out.size(1) == pr.Tq &&
                        grad_out.size(2) == pr.H * pr.D,
                    "attention_backward: grad_out must be (", pr.B, ", ", pr.Tq, ", ", pr.H * pr.D, "), got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == pr.B && lse.size(1) == pr.H &&
                        lse.size(2) == pr.Tq && lse.is_contiguous(),
                    "attention_backward: lse must be contiguous float32 (", pr.B, ", ", pr.H, ", ", pr.Tq, ")");
  const at::Tensor go = grad_out.to(qkv.scalar_type()).contiguous();
  // Rows of q that are not queries get no gradient: zero the buffer unless every token is a query.
  at::Tensor dqkv = pr.Tq == pr.T ? at::empty_like(qkv) : at::zeros_like(qkv);
  if (qkv.numel() == 0 || pr.Tq == 0) return pr.Tq == 0 ? at::zeros_like(qkv) : dqkv;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "attention_backward", [&] {
    const scalar_t* kp = pr.Tp > 0 ? k_prefix->data_ptr<scalar_t>() : nullptr;
    const scalar_t* vp = pr.Tp > 0 ? v_prefix->data_ptr<scalar_t>() : nullptr;
    backward_impl<scalar_t>(pr, qkv.data_ptr<scalar_t>(), kp, vp, go.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                            dqkv.data_ptr<scalar_t>());
  });
  return dqkv;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_op(const at::Tensor& qkv, const std::optional<at::Tensor>& k_prefix,
                                                        const std::optional<at::Tensor>& v_prefix,
                                                        const at::Tensor& key_valid, const at::Tensor& query_pos,
                                                        double p, int64_t seed, bool need_lse) {
  return attention_forward(qkv, k_prefix, v_prefix, key_valid, query_pos, p, seed, need_lse, std::nullopt);
}

}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def(
      "attention_forward(Tensor qkv, Tensor? k_prefix, Tensor? v_prefix, Tensor key_valid, Tensor query_pos, "
      "float p, int seed, bool need_lse, Tensor? qkv_bias=None) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor qkv, Tensor? k_prefix, Tensor? v_prefix, Tensor key_valid, "
      "Tensor query_pos, Tensor lse, float p, int seed, Tensor? qkv_bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("attention_forward", &harmodt::attention_forward);
  m.impl("attention_backward", &harmodt::attention_backward);
}
