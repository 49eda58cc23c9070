// bf16 GEMM on AVX512-BF16 (vdpbf16ps): out (M, N) = a (M, K) b (K, N) (+ bias), bf16 operands,
// fp32 accumulation, out bf16 (rounded once, to nearest even, as oneDNN's GEMM rounds).
//
// Why our own: under CPU bf16 autocast the block GEMMs went through at::mm -> oneDNN, which ran at
// 315-321 GFLOP/s inside a training step on this project's 2-core Zen 4 machines (peak ~450 for
// vdpbf16ps on both cores) and spends ~40 us per call on fixed work (primitive lookup, reordering
// b into its VNNI layout). The model's GEMMs are few and alike (M ~600 rows, K and N 256-1024), so
// one register-blocked kernel covers them:
//
// * b may also be an fp32 weight W or W^T (with its task's packed mask): rounded to bf16 (and
//   masked) while it is packed, so a bf16 block GEMM needs no W * M copy in bf16.
// * b is packed per panel of kNr = 32 columns into VNNI pairs: for k-pair p, the 32 columns' values
//   (b[2p][n], b[2p+1][n]) side by side, 128 bytes (odd K: the last pair's second half is 0). A
//   plain b interleaves two rows; a transposed b (the forward's W^T) transposes 16x16 blocks of
//   32-bit pairs.
// * a is read as 32-bit pairs (a[i][2p], a[i][2p+1]) broadcast to all lanes: straight from a
//   row-major a with even K and row stride, else from a copy packed as a^T in pairs ([p][M]).
// * the micro-kernel keeps a kMr x 32 block of out in 2 * kMr zmm accumulators over the whole of K
//   (no partial sums through memory), then rounds and stores it once.
// * the threads split the column panels (and the rows, when there are fewer panels than threads);
//   each packs its own panels of b.
//
// Without AVX512-BF16 at compile time (a portable build) or at run time, bf16_gemm_available() is
// false and gemm.cpp keeps at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace harmodt {

#if defined(__AVX512BF16__) && defined(HARMODT_AVX512_CVT)
#define HARMODT_BF16_GEMM 1
#endif

bool bf16_gemm_available() {
#if defined(HARMODT_BF16_GEMM)
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

#if defined(HARMODT_BF16_GEMM)
namespace {

constexpr int kMr = 12;  // rows per micro-tile: 2 * kMr accumulators + 2 b registers of 32
constexpr int kNr = 32;  // columns per panel (two zmm of fp32)

using u16 = uint16_t;
using u32 = uint32_t;


// 32 bf16 of row r0 (v0) and of row r1 (v1) -> 32 pairs (v0[i], v1[i]) as 32-bit words (v0's in the
// low half): pairs 0-15 in lo, 16-31 in hi. Two word permutes (vpermt2w) instead of widening each
// row and shifting and or-ing them together.
inline void interleave32(__m512i v0, __m512i v1, __m512i& lo, __m512i& hi) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  lo = _mm512_permutex2var_epi16(v0, _mm512_load_si512(kLo), v1);
  hi = _mm512_permutex2var_epi16(v0, _mm512_load_si512(kHi), v1);
}

inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << n) - 1u); }

// Where b's values come from: bf16 memory, or an fp32 matrix rounded to bf16 as it is packed (to
// nearest even, as apply_masks_ and c10 round), optionally through packed mask bits over its rows
// (clear bit: 0). The matrix under b is w (rows x ld), b = w or w^T; `row`, `col` index w.
struct BSource {
  const u16* b16 = nullptr;
  const float* b32 = nullptr;
  const u32* bits = nullptr;  // (rows, wpr) words, with b32 only
  int64_t wpr = 0;
  int64_t ld = 0;  // w's row stride in elements

  // the mask word's bits for columns col .. col + 31 of `row` (col a multiple of 32)
  u32 word(int64_t row, int64_t col) const { return bits == nullptr ? 0xFFFFFFFFu : bits[row * wpr + col / 32]; }
  // 32 values of `row` from column col (a multiple of 32), lanes in m, as bf16
  __m512i load32(int64_t row, int64_t col, __mmask32 m) const {
    if (b16 != nullptr) return _mm512_maskz_loadu_epi16(m, b16 + row * ld + col);
    m &= word(row, col);
    const float* r = b32 + row * ld + col;
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), r + 16),
                                           _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), r));
    return reinterpret_cast<const __m512i&>(v);
  }
  // 32 pairs (row r0, row r1) of columns col .. col + 31 (col a multiple of 32; lanes in m; r1 < 0:
  // zeros): columns col .. col + 15 in lo, the next 16 in hi
  void pairs32(int64_t r0, int64_t r1, int64_t col, __mmask32 m, __m512i& lo, __m512i& hi) const {
    interleave32(load32(r0, col, m), r1 < 0 ? _mm512_setzero_si512() : load32(r1, col, m), lo, hi);
  }
};

// Panels lo .. hi of plain b (b[k][n] = b + k * ldb + n, N columns) into out + (panel - lo) * ps,
// pairs p_lo .. p_hi of K (rows 2 p_lo .. 2 p_hi). Walked pair of rows by pair of rows across the
// panels: each row is read once, in order (a walk down one panel's 32 columns would meet every
// row's line at the row stride).
void pack_b_rows(const BSource& b, int64_t k, int64_t n, int64_t lo, int64_t hi, int64_t ps, u32* out, int64_t p_lo, int64_t p_hi) {
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const int64_t r0 = 2 * p, r1 = 2 * p + 1 < k ? 2 * p + 1 : -1;
    for (int64_t panel = lo; panel < hi; ++panel) {
      const int64_t n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
      u32* o = out + (panel - lo) * ps + p * kNr;
      __m512i v0, v1;  // (columns past n: zero pairs)
      b.pairs32(r0, r1, n0, tail_mask32(nc), v0, v1);
      _mm512_storeu_si512(o, v0);
      _mm512_storeu_si512(o + 16, v1);
    }
  }
}

// 16x16 transpose of 32-bit lanes, in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[i] now holds, per 128-bit lane L, rows 4L'..: combine lanes across groups of 4 rows
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) t[4 * i + j] = r[4 * i + j];
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a = t[j], b = t[4 + j], c = t[8 + j], d = t[12 + j];
    const __m512i ab_lo = _mm512_shuffle_i32x4(a, b, 0x44), ab_hi = _mm512_shuffle_i32x4(a, b, 0xEE);
    const __m512i cd_lo = _mm512_shuffle_i32x4(c, d, 0x44), cd_hi = _mm512_shuffle_i32x4(c, d, 0xEE);
    r[j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
}

// Panel of transposed b (b[k][n] = w + n * ldw + k, i.e. b = w^T for a row-major w (N, K)):
// columns n0 .. n0 + nc (nc <= 32), all K. Pair p of column n is the 32-bit word at w[n][2p].
void pack_b_cols(const BSource& w, int64_t k, int64_t n0, int64_t nc, u32* out) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t g = 0; g < 2; ++g) {  // two groups of 16 columns
    const int64_t c0 = g * 16, cn = std::min<int64_t>(std::max<int64_t>(nc - c0, 0), 16);
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      const int64_t elems = std::min<int64_t>(k - 2 * p0, 32);  // bf16 of each row in this block
      const __mmask32 em = tail_mask32(elems);
      __m512i r[16];
      for (int c = 0; c < 16; ++c)
        r[c] = c < cn ? w.load32(n0 + c0 + c, 2 * p0, em) : _mm512_setzero_si512();
      transpose16(r);  // r[j]: pair p0 + j of the 16 columns
      const int64_t np = std::min<int64_t>(kp - p0, 16);
      for (int j = 0; j < np; ++j) _mm512_storeu_si512(out + (p0 + j) * kNr + c0, r[j]);
    }
  }
}

// Pairs p0 .. p1 of a packed as a^T in pairs: out[p * ld + i] = (a[i][2p], a[i][2p + 1]) for all m
// rows (odd K: the last pair's second half 0); a tile's rows i0 .. i0 + 12 of pair p are then
// 12 adjacent words, as in a row-major a. a[i][k] = a + i * s_i + k * s_k. A transposed a (s_i ==
// 1, e.g. dY^T) interleaves two contiguous rows of the tensor under it, 16 words at a time.
void pack_a(const u16* a, int64_t s_i, int64_t s_k, int64_t m, int64_t k, int64_t p0, int64_t p1, int64_t ld, u32* out) {
  for (int64_t p = p0; p < p1; ++p) {
    u32* o = out + p * ld;
    if (s_i == 1) {
      const u16* r0 = a + 2 * p * s_k;
      const u16* r1 = 2 * p + 1 < k ? r0 + s_k : nullptr;
      for (int64_t i = 0; i < m; i += 32) {
        const __mmask32 mm = tail_mask32(m - i);
        __m512i v0, v1;
        interleave32(_mm512_maskz_loadu_epi16(mm, r0 + i), r1 ? _mm512_maskz_loadu_epi16(mm, r1 + i) : _mm512_setzero_si512(), v0, v1);
        _mm512_mask_storeu_epi32(o + i, tail_mask(m - i), v0);
        if (m - i > 16) _mm512_mask_storeu_epi32(o + i + 16, tail_mask(m - i - 16), v1);
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const u16* r = a + i * s_i + 2 * p * s_k;
        o[i] = r[0] | (2 * p + 1 < k ? static_cast<u32>(r[s_k]) << 16 : 0u);
      }
    }
  }
}

// The 64-byte lines of [p, p + bytes) prefetched into L1, for writing or for reading: an output
// block's row segment (32 columns: one line in bf16, two in fp32), fetched before its k loop.
inline void prefetch_lines(const void* p, int bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int o = 0; o < bytes; o += 64) write ? _m_prefetchw(const_cast<char*>(c + o)) : _mm_prefetch(c + o, _MM_HINT_T0);
}

// ---- epilogues: what becomes of a finished kMr x 32 block of fp32 sums (rows i0.., columns n0..,
// nc of them live), applied while it is still in registers ------------------------------------

// out bf16 = sums (+ bf16 bias), rounded once: the plain GEMM.
struct StoreBf16 {
  c10::BFloat16* out;
  int64_t ld;
  const c10::BFloat16* bias;  // or null
  void prefetch(int64_t i, int64_t n0) const { prefetch_lines(out + i * ld + n0, 64, true); }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(std::max<int64_t>(nc - 16, 0));
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias != nullptr) b0 = load16(bias + n0, m0), b1 = load16(bias + n0 + 16, m1);
    for (int i = 0; i < MR; ++i) {
      c10::BFloat16* o = out + (i0 + i) * ld + n0;
      store16(o, _mm512_add_ps(acc[i][0], b0), m0);
      if (m1) store16(o + 16, _mm512_add_ps(acc[i][1], b1), m1);
    }
  }
};

// out bf16 = relu(sums + fp32 bias), rounded once (the fc layer).
struct BiasReluBf16 {
  c10::BFloat16* out;
  int64_t ld;
  const float* bias;
  void prefetch(int64_t i, int64_t n0) const { prefetch_lines(out + i * ld + n0, 64, true); }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(std::max<int64_t>(nc - 16, 0));
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, bias + n0), b1 = _mm512_maskz_loadu_ps(m1, bias + n0 + 16), zero = _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      c10::BFloat16* o = out + (i0 + i) * ld + n0;
      store16(o, _mm512_max_ps(_mm512_add_ps(acc[i][0], b0), zero), m0);
      if (m1) store16(o + 16, _mm512_max_ps(_mm512_add_ps(acc[i][1], b1), zero), m1);
    }
  }
};

// out fp32 = res + dropout(sums + fp32 bias) with dropout.cpp's keep mask over the flat index
// row * N + column (the residual stream after proj and mlp_proj).
struct BiasDropoutAdd {
  float* out;
  const float* res;
  int64_t ld;
  const float* bias;
  uint64_t seed;
  uint32_t threshold;  // round(p * 65536), <= 0xFFFF
  float scale;         // 1 / (1 - p)
  void prefetch(int64_t i, int64_t n0) const {
    prefetch_lines(out + i * ld + n0, 128, true);
    prefetch_lines(res + i * ld + n0, 128, false);
  }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const __mmask16 m[2] = {tail_mask(nc), tail_mask(std::max<int64_t>(nc - 16, 0))};
    const __m512 thr_scale = _mm512_set1_ps(scale);
    const __m512i thr = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
    for (int h = 0; h < 2; ++h) {
      if (!m[h]) continue;
      const __m512 b = _mm512_maskz_loadu_ps(m[h], bias + n0 + 16 * h);
      for (int i = 0; i < MR; ++i) {
        const int64_t at = (i0 + i) * ld + n0 + 16 * h;
        const __mmask16 keep = threshold == 0 ? m[h] : static_cast<__mmask16>(keep16(seed, at, thr) & m[h]);
        const __m512 v = _mm512_maskz_mul_ps(keep, _mm512_add_ps(acc[i][h], b), thr_scale);
        _mm512_mask_storeu_ps(out + at, m[h], _mm512_add_ps(_mm512_maskz_loadu_ps(m[h], res + at), v));
      }
    }
  }
};

// out fp32 = sums where the packed mask's bit is set, else 0 (a weight gradient masked, Eq. 4); the
// kept values' squares summed per thread (in fp32 per block, fp64 across blocks).
struct MaskedGrad {
  float* out;
  int64_t ld;
  const u32* words;  // (M, ceil(N / 32)): one word per row per 32-column panel
  int64_t wpr;
  double* sq;  // per thread
  void prefetch(int64_t i, int64_t n0) const { prefetch_lines(out + i * ld + n0, 128, true); }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(std::max<int64_t>(nc - 16, 0));
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const u32 w = words[(i0 + i) * wpr + n0 / kNr];
      const __m512 v0 = _mm512_maskz_mov_ps(static_cast<__mmask16>(w) & m0, acc[i][0]);
      const __m512 v1 = _mm512_maskz_mov_ps(static_cast<__mmask16>(w >> 16) & m1, acc[i][1]);
      float* o = out + (i0 + i) * ld + n0;
      _mm512_mask_storeu_ps(o, m0, v0);
      if (m1) _mm512_mask_storeu_ps(o + 16, m1, v1);
      sum = _mm512_fmadd_ps(v0, v0, _mm512_fmadd_ps(v1, v1, sum));
    }
    sq[tid] += static_cast<double>(_mm512_reduce_add_ps(sum));
  }
};

// out bf16 = sums where the ReLU's output z (bf16, like out) is > 0, else 0 (its backward: dz from
// the next layer's dx GEMM); the kept values' column sums per thread (the fc bias gradient, fp32,
// from the unrounded values).
struct ReluGradBf16 {
  c10::BFloat16* out;
  const c10::BFloat16* z;
  int64_t ld;
  float* colsum;  // per thread: threads x ld
  void prefetch(int64_t i, int64_t n0) const {
    prefetch_lines(out + i * ld + n0, 64, true);
    prefetch_lines(z + i * ld + n0, 64, false);
  }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const __mmask16 m[2] = {tail_mask(nc), tail_mask(std::max<int64_t>(nc - 16, 0))};
    const __m512 zero = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      if (!m[h]) continue;
      __m512 sum = zero;
      for (int i = 0; i < MR; ++i) {
        const int64_t at = (i0 + i) * ld + n0 + 16 * h;
        const __mmask16 on = _mm512_mask_cmp_ps_mask(m[h], load16(z + at, m[h]), zero, _CMP_GT_OQ);
        const __m512 v = _mm512_maskz_mov_ps(on, acc[i][h]);
        store16(out + at, v, m[h]);
        sum = _mm512_add_ps(sum, v);
      }
      float* c = colsum + tid * ld + n0 + 16 * h;
      _mm512_mask_storeu_ps(c, m[h], _mm512_add_ps(_mm512_maskz_loadu_ps(m[h], c), sum));
    }
  }
};

// Block (i0, n0) of the output: sum_p a_pair(i, p) . bp[p] for i < MR, a_pair(i, p) = a[i * ars + p * aps],
// handed to the epilogue. The lines the epilogue will write (and read) are prefetched first (the
// epilogue meets them thousands of cycles later); `next` (or null): the next tile's kMr rows of a
// row-major a (same ars), prefetched a line per row every 16 pairs while this block computes.
template <int MR, typename Epi>
void micro(int64_t kp, const u32* a, int64_t ars, int64_t aps, const u32* bp, const Epi& epi, int64_t i0, int64_t n0, int64_t nc,
           int tid, const u32* next) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) epi.prefetch(i0 + i, n0);
  for (int64_t p = 0; p < kp; ++p) {
    if (next != nullptr && (p & 15) == 0)
      for (int i = 0; i < kMr; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * ars + p), _MM_HINT_T0);
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + p * kNr);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + p * kNr + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * ars + p * aps]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, b1);
    }
  }
  epi(acc, i0, n0, nc, tid);
}

template <typename Epi, int MR = kMr>
void micro_rows(int64_t mr, int64_t kp, const u32* a, int64_t ars, int64_t aps, const u32* bp, const Epi& epi, int64_t i0,
                int64_t n0, int64_t nc, int tid, const u32* next) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro<MR, Epi>(kp, a, ars, aps, bp, epi, i0, n0, nc, tid, next);
    return micro_rows<Epi, MR - 1>(mr, kp, a, ars, aps, bp, epi, i0, n0, nc, tid, next);
  }
}


// One OpenMP region per GEMM: packing, a barrier, then the tiles. a, when it needs packing, is
// packed whole (the threads split its pairs). Then one of two loop orders; the operand read again
// and again is the smaller one, so it stays in cache:
// * b-shared: every panel of b packed once, then the threads split the row tiles; each tile meets
//   every panel. The threads split the packing by the rows of the memory under b: a row-major b
//   by pairs of rows (its K), a transposed b (W^T) by panels (W's rows), alongside a's pairs.
// * panel-outer: the threads split the column panels (and the rows, when there are fewer panels
//   than threads); each packs its own panels, then walks all tiles of a through groups of them.
// b-shared is the order when b is the smaller operand, and when a is read in place over at least
// kSharedTiles row tiles whatever N. Each thread then writes and reads the same rows as the ops
// before and after it (their row splits), and reads its rows of the weights and activations that it
// wrote itself. That matters most when this VM's two vCPUs sit on different CCDs of the host
// (bench/README.md, "The slow state"): there a line the other core has cached costs ~340 ns to
// fetch or to take back for writing, against ~60 ns on one CCD. Measured at the paper's size (bf16
// step): K = 256 GEMMs with N = 768 and 1024 b-shared, 0.97 of the step in the slow state and
// 0.99 in the quiet one; the row-major b's packing split by K, another 0.99 in the slow state.
// GEMMs under kSerialFlop run on the calling thread alone (a fork and join costs more there).
constexpr double kSerialFlop = 2.0e6;
// Packed panels a thread walks together in the panel-outer order: about a third of a Zen 4 core's L2.
constexpr int64_t kGroupBytes = 384 * 1024;
// Row tiles from which a row-major a read in place takes the b-shared order whatever N (fewer:
// the last block's 160 rows measured faster panel-outer).
constexpr int64_t kSharedTiles = 16;
// GEMMs between two probes of where the threads sit (topology.cpp's threads_apart; ~6 steps).
constexpr int64_t kProbePeriod = 512;

// The lines of [p, p + words) dropped from every cache (written back first where dirty).
inline void drop_lines(const u32* p, int64_t words) {
  const char* end = reinterpret_cast<const char*>(p + words);
  for (const char* c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63)); c < end; c += 64) {
#if defined(__CLFLUSHOPT__)
    _mm_clflushopt(const_cast<char*>(c));
#else
    _mm_clflush(c);
#endif
  }
}

template <typename Epi>
void run(const Epi& epi, const u16* a, int64_t as0, int64_t as1, const BSource& b, bool b_rows, int64_t m, int64_t k, int64_t n,
         int threads) {
  const int64_t kp = (k + 1) / 2;
  const int64_t panels = (n + kNr - 1) / kNr, tiles = (m + kMr - 1) / kMr;
  // a read in place: row-major with even K and an even row stride (each pair one aligned-enough word)
  const bool a_direct = as1 == 1 && k % 2 == 0 && as0 % 2 == 0 && reinterpret_cast<uintptr_t>(a) % 4 == 0;
  // packed panels lie ps words apart: past the kp * 32 words of a panel, 16 more, so that the
  // panels' starts do not all fall in one L1 set
  const int64_t ps = kp * kNr + 16;
  auto pack_panels = [&](int64_t lo, int64_t hi, u32* dst) {  // panels lo .. hi into dst, ps apart
    if (b_rows) return pack_b_rows(b, k, n, lo, hi, ps, dst, 0, kp);
    for (int64_t panel = lo; panel < hi; ++panel)
      pack_b_cols(b, k, panel * kNr, std::min<int64_t>(kNr, n - panel * kNr), dst + (panel - lo) * ps);
  };
  // the packed rows' stride: a multiple of 16 words (whole vectors) that is not a power of two (a
  // tile's pairs at a power-of-two stride would all fall in one L1 set)
  const int64_t ld_pack = (m + 15) / 16 * 16 + 16;
  u32* apack = a_direct ? nullptr : scratch<u32>(0, kp * ld_pack);  // the caller's scratch, read by every thread
  // fetch_next: the tile's block is the first to read its rows of a (a row-major a only: a packed
  // a's next tile mostly shares this one's lines), so it prefetches the next full tile's rows
  auto tile = [&](int64_t t, int64_t panel, const u32* bp, int tid, bool fetch_next) {
    const int64_t i0 = t * kMr, mr = std::min<int64_t>(kMr, m - i0), n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
    if (apack == nullptr) {
      const u32* next = fetch_next && i0 + 2 * kMr <= m ? reinterpret_cast<const u32*>(a + (i0 + kMr) * as0) : nullptr;
      micro_rows<Epi>(mr, kp, reinterpret_cast<const u32*>(a + i0 * as0), as0 / 2, 1, bp, epi, i0, n0, nc, tid, next);
    } else {
      micro_rows<Epi>(mr, kp, apack + i0, 1, ld_pack, bp, epi, i0, n0, nc, tid, nullptr);
    }
  };
  const bool b_shared = (panels * kp * kNr <= tiles * kp * kMr || (a_direct && tiles >= kSharedTiles)) && tiles >= threads;
  u32* bp_all = b_shared ? scratch<u32>(1, panels * ps) : nullptr;  // the caller's scratch, read by every thread
  const int64_t row_splits = panels >= threads ? 1 : std::min<int64_t>(tiles, (threads + panels - 1) / panels);
  // Two threads on two CCDs of the host (no shared L3; topology.cpp): a packed line that one
  // thread wrote and the other read stays in both caches, and the writer's next packing into it
  // has to take it back across the host, ~340 ns a line (a 512 KB buffer: 233 us against 5). So
  // once both are done, each drops the lines the other packed from every cache. Measured in that
  // state: bf16 step 59.2 against 67.1 ms; on one CCD it costs ~2 %, so only then.
  const bool drop_shared = threads == 2 && (b_shared || apack != nullptr) && threads_apart(kProbePeriod);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t lo, hi;
    if (apack != nullptr) {
      share(kp, tid, nt, lo, hi);
      pack_a(a, as0, as1, m, k, lo, hi, ld_pack, apack);
    }
    if (b_shared && b_rows) {  // (all panels, this thread's pairs of rows)
      share(kp, tid, nt, lo, hi);
      pack_b_rows(b, k, n, 0, panels, ps, bp_all, lo, hi);
    } else if (b_shared) {
      share(panels, tid, nt, lo, hi);
      pack_panels(lo, hi, bp_all + lo * ps);
    }
    if (nt > 1 && (apack != nullptr || b_shared)) {
#pragma omp barrier
    }
    if (b_shared) {
      share(tiles, tid, nt, lo, hi);
      for (int64_t t = lo; t < hi; ++t)
        for (int64_t panel = 0; panel < panels; ++panel) tile(t, panel, bp_all + panel * ps, tid, panel == 0 && t + 1 < hi);
    } else {
      share(panels * row_splits, tid, nt, lo, hi);
      if (lo < hi) {  // this thread's panels, packed all at once into its own scratch
        const int64_t p_lo = lo / row_splits, p_hi = (hi - 1) / row_splits + 1;
        u32* bp = scratch<u32>(2, (p_hi - p_lo) * ps);
        pack_panels(p_lo, p_hi, bp);
        if (row_splits == 1) {
          // groups of panels that stay in L2 together, each group row tile by row tile: a tile's
          // rows are written group-wide and read once per group (a walk down one panel at a time
          // writes the output in 64-byte strips at the row stride, which N = 1024 makes 2 KB: a
          // few L1 sets for the whole strip)
          const int64_t group = std::max<int64_t>(1, kGroupBytes / (ps * 4));
          for (int64_t g0 = p_lo; g0 < p_hi; g0 += group)
            for (int64_t t = 0; t < tiles; ++t)
              for (int64_t panel = g0; panel < std::min(g0 + group, p_hi); ++panel) tile(t, panel, bp + (panel - p_lo) * ps, tid, panel == g0);
        } else {
          for (int64_t w = lo; w < hi; ++w) {
            const int64_t panel = w / row_splits, split = w % row_splits;
            const int64_t t_lo = tiles * split / row_splits, t_hi = tiles * (split + 1) / row_splits;
            for (int64_t t = t_lo; t < t_hi; ++t) tile(t, panel, bp + (panel - p_lo) * ps, tid, t + 1 < t_hi);
          }
        }
      }
    }
    if (drop_shared && nt == 2) {  // the other thread's share of the packing, as split above
#pragma omp barrier
      const int other = 1 - tid;
      if (b_shared && b_rows) {
        share(kp, other, nt, lo, hi);
        for (int64_t panel = 0; panel < panels; ++panel) drop_lines(bp_all + panel * ps + lo * kNr, (hi - lo) * kNr);
      } else if (b_shared) {
        share(panels, other, nt, lo, hi);
        drop_lines(bp_all + lo * ps, (hi - lo) * ps);
      }
      if (apack != nullptr) {
        share(kp, other, nt, lo, hi);
        drop_lines(apack + lo * ld_pack, (hi - lo) * ld_pack);
      }
      _mm_sfence();
    }
  }
}

// a and b as the kernel reads them: each with a unit stride (else copied), strides normalized for
// one-row / one-column views; the threads to use.
struct Operands {
  at::Tensor a, b, mask;
  const u16* ap;
  BSource src;
  bool b_rows;  // b row-major (packed by pairs of rows) or transposed (by 16 x 16 blocks)
  int64_t as0, as1, m, k, n;
  int threads;
  // b bf16, or fp32 (rounded as packed) with optional packed mask bits over the rows of the matrix
  // under b (b itself when row-major, b^T when transposed)
  Operands(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& b_mask = at::Tensor())
      : a(a_in.stride(0) == 1 || a_in.stride(1) == 1 ? a_in : a_in.contiguous()),
        b(b_in.stride(0) == 1 || b_in.stride(1) == 1 ? b_in : b_in.contiguous()),
        mask(b_mask.defined() ? b_mask.contiguous() : b_mask) {
    ap = reinterpret_cast<const u16*>(a.data_ptr());
    m = a.size(0), k = a.size(1), n = b.size(1);
    as0 = a.stride(0), as1 = a.stride(1);
    int64_t bs0 = b.stride(0), bs1 = b.stride(1);
    if (as1 != 1 && m == 1) as1 = 1;  // one row: row-major
    if (bs1 != 1 && k == 1 && !mask.defined()) bs1 = 1, bs0 = n;  // (with a mask, b stays W or W^T: the mask's rows are W's)
    b_rows = bs1 == 1;
    src.ld = b_rows ? bs0 : bs1;
    if (b.scalar_type() == at::kBFloat16) {
      src.b16 = reinterpret_cast<const u16*>(b.data_ptr());
    } else {
      src.b32 = b.data_ptr<float>();
      if (mask.defined()) src.bits = reinterpret_cast<const u32*>(mask.data_ptr<int32_t>()), src.wpr = mask.size(1);
    }
    threads = at::in_parallel_region() || 2.0 * m * n * k < kSerialFlop ? 1 : at::get_num_threads();
  }
  template <typename Epi>
  void run(const Epi& epi) const {
    harmodt::run(epi, ap, as0, as1, src, b_rows, m, k, n, threads);
  }
};

}  // namespace
#endif

// out (M, N) contiguous bf16; a (M, K) bf16, b (K, N) bf16 or fp32 (rounded to bf16 as it is
// packed, through b_mask's bits if given: see Operands), each with a unit stride in some dim (else
// copied); bias: undefined or bf16 (N,), added to every row before the rounding.
void bf16_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& b_mask) {
  TORCH_CHECK(bf16_gemm_available(), "gemm: the native bf16 GEMM needs AVX512-BF16 (this build or CPU lacks it)");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && (b.scalar_type() == at::kBFloat16 || b.scalar_type() == at::kFloat),
              "bf16_gemm_out: a must be bf16 and b bf16 or fp32");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kBFloat16, "bf16_gemm_out: out must be contiguous bf16");
  TORCH_CHECK(!bias.defined() || (bias.scalar_type() == at::kBFloat16 && bias.numel() == b.size(1)), "bf16_gemm_out: bias must be bf16 (N,)");
#if defined(HARMODT_BF16_GEMM)
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) return fill_empty_product(out, bias);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  Operands(a, b, b_mask).run(StoreBf16{out.data_ptr<c10::BFloat16>(), n, bias.defined() ? bias_.data_ptr<c10::BFloat16>() : nullptr});
#endif
}

// The GEMM with its epilogue fused (gemm.cpp's gemm_epilogue op checks the arguments): a (M, K), b
// (K, N) bf16; bias fp32 (N,); residual fp32 contiguous (M, N); mask int32 (M, ceil(N / 32)).
std::tuple<at::Tensor, at::Tensor> bf16_gemm_epilogue(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind,
                                                      const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& mask,
                                                      int64_t seed, double p, const at::Tensor& b_mask) {
  TORCH_CHECK(bf16_gemm_available(), "gemm_epilogue: the native bf16 GEMM needs AVX512-BF16 (this build or CPU lacks it)");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool bf16_out = kind == GemmEpilogue::kBiasRelu || kind == GemmEpilogue::kReluGrad;
  at::Tensor out = at::empty({m, n}, a.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  at::Tensor sq = epilogue_sums(kind, n, a.options());
  if (m == 0 || n == 0) return {out, sq};
#if defined(HARMODT_BF16_GEMM)
  const Operands ops(a, b, b_mask);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  const at::Tensor res_ = residual.defined() ? residual.contiguous() : residual;
  if (k == 0) {  // sums of nothing: 0 (through the same epilogue below, from a one-column zero product)
    const at::Tensor z = at::zeros({m, 1}, a.options()), zb = at::zeros({1, n}, a.options());
    return bf16_gemm_epilogue(z, zb, kind, bias, residual, mask, seed, p, at::Tensor());
  }
  switch (kind) {
    case GemmEpilogue::kBiasRelu:
      ops.run(BiasReluBf16{out.data_ptr<c10::BFloat16>(), n, bias_.data_ptr<float>()});
      break;
    case GemmEpilogue::kBiasDropoutAdd:
      ops.run(BiasDropoutAdd{out.data_ptr<float>(), res_.data_ptr<float>(), n, bias_.data_ptr<float>(), static_cast<uint64_t>(seed),
                             static_cast<uint32_t>(std::llround(p * 65536.0)), static_cast<float>(1.0 / (1.0 - p))});
      break;
    case GemmEpilogue::kReluGrad: {
      std::vector<float> part(static_cast<size_t>(std::max(ops.threads, 1) * n), 0.0f);
      ops.run(ReluGradBf16{out.data_ptr<c10::BFloat16>(), res_.data_ptr<c10::BFloat16>(), n, part.data()});
      float* total = sq.data_ptr<float>();
      for (int t = 0; t < std::max(ops.threads, 1); ++t)
        for (int64_t j = 0; j < n; ++j) total[j] += part[t * n + j];
      break;
    }
    case GemmEpilogue::kMaskedGrad: {
      std::vector<double> part(static_cast<size_t>(std::max(ops.threads, 1)), 0.0);
      const at::Tensor words = mask.contiguous();
      ops.run(MaskedGrad{out.data_ptr<float>(), n, reinterpret_cast<const u32*>(words.data_ptr<int32_t>()), words.size(1), part.data()});
      double total = 0.0;
      for (double v : part) total += v;
      sq.fill_(total);
      break;
    }
  }
#endif
  return {out, sq};
}

}  // namespace harmodt
