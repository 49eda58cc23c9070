// AVX-512 GEMMs: out (M, N) = a (M, K) b (K, N) (+ bias) with fp32 accumulation, in two operand
// formats that share everything but their inner product and how they pack:
//
// * bf16 (AVX512-BF16, vdpbf16ps): bf16 operands, out bf16 (rounded once, to nearest even, as
//   oneDNN's GEMM rounds) or an epilogue's dtype. Under CPU bf16 autocast the block GEMMs went
//   through at::mm -> oneDNN, which ran at 315-321 GFLOP/s inside a training step on this project's
//   2-core Zen 4 machines (peak ~450 for vdpbf16ps on both cores) and spends ~40 us per call on fixed
//   work (primitive lookup, reordering b into its VNNI layout).
// * fp32 (AVX-512F, vfmadd231ps): fp32 operands and output. oneDNN's fp32 matmul runs the model's
//   shapes at ~200 GFLOP/s here, about what this kernel does; owning it lets the mask, the bias, the
//   ReLU, the dropout and the residual add ride along (no W * M buffer, no pass over the output
//   after the GEMM) and lets the threads share packed operands in the way "The slow state" below
//   needs.
//
// The model's GEMMs are few and alike (M ~600 rows, K and N 256-1024), so one register-blocked
// kernel covers them:
//
// * k is walked in units of one 32-bit word: a pair of bf16 k (VNNI), or one fp32 k.
// * b may be an fp32 weight W or W^T with its task's packed mask: masked (and, for bf16, rounded)
//   while it is packed, so a masked GEMM needs no W * M copy.
// * b is packed per panel of kNr = 32 columns: for unit p, the 32 columns' words side by side (128
//   bytes; an odd K's last bf16 pair has a zero second half). A plain b is copied (bf16: two rows
//   interleaved); a transposed b (the forward's W^T) goes through 16 x 16 transposes of words.
// * a's words are broadcast to all lanes: straight from a row-major a, else from a copy packed as
//   a^T by units ([p][M]).
// * the micro-kernel keeps a kMr x 32 block of out in 2 * kMr zmm accumulators over the whole of K
//   (each output one fp32 sum in k order whatever M, N or the thread count: deterministic, and no
//   partial sums through memory), then hands it to the epilogue, which writes it once.
//
// Without AVX-512 (BW, DQ, VL) at compile time or at run time the fp32 format is absent
// (gemm_avx2.cpp's kernel or oneDNN then); without AVX512-BF16 the bf16 one is, and
// bf16_gemm_available() is false (gemm.cpp keeps at::mm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace harmodt {

#if defined(HARMODT_AVX512_GEMM) && defined(__AVX512BF16__)
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

#if defined(HARMODT_AVX512_GEMM)
bool f32_gemm_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}

namespace {

constexpr int kMr = 12;  // rows per micro-tile: 2 * kMr accumulators + 2 b registers of 32 columns
constexpr int kNr = 32;  // columns per panel (two zmm of fp32)
static_assert(kMr == kSumRows, "the epilogues' sums are in common.h's kSumRows-row groups");

using u16 = uint16_t;
using u32 = uint32_t;

inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << n) - 1u); }

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

// Where b's values come from: bf16 memory, or fp32 memory (for the bf16 format rounded to bf16 as
// it is packed, to nearest even as apply_masks_ and c10 round), optionally through packed mask bits
// over its rows (clear bit: +0). The matrix under b is w (rows x ld), b = w or w^T; `row`, `col`
// index w.
struct BSource {
  const u16* b16 = nullptr;
  const float* b32 = nullptr;
  const u32* bits = nullptr;  // (rows, wpr) words, with b32 only
  int64_t wpr = 0;
  int64_t ld = 0;  // w's row stride in elements

  // the mask bits of columns col .. col + 31 of `row` (col a multiple of 32)
  u32 word(int64_t row, int64_t col) const { return bits == nullptr ? 0xFFFFFFFFu : bits[row * wpr + col / 32]; }
  // 16 fp32 values of `row` from column col (a multiple of 16), lanes in m, masked
  __m512 load16f(int64_t row, int64_t col, __mmask16 m) const {
    if (bits != nullptr) m &= static_cast<__mmask16>(bits[row * wpr + col / 32] >> (col & 16));
    return _mm512_maskz_loadu_ps(m, b32 + row * ld + col);
  }
#if defined(HARMODT_BF16_GEMM)
  // 32 values of `row` from column col (a multiple of 32), lanes in m, as bf16
  __m512i load32(int64_t row, int64_t col, __mmask32 m) const {
    if (b16 != nullptr) return _mm512_maskz_loadu_epi16(m, b16 + row * ld + col);
    m &= word(row, col);
    const float* r = b32 + row * ld + col;
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), r + 16),
                                           _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), r));
    return reinterpret_cast<const __m512i&>(v);
  }
#endif
};

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

// ---- the two formats: the unit of k, packing, and the inner product ---------------------------

#if defined(HARMODT_BF16_GEMM)
struct Bf16Format {
  using Elem = u16;  // a's (and a bf16 b's) element
  using Word = u32;  // a packed unit: a pair of bf16
  static constexpr int kPer = 2;  // k per unit
  static constexpr bool kTilePack = false;  // a packed whole, shared by the threads (pack_a)
  static int64_t units(int64_t k) { return (k + 1) / 2; }
  // a read in place: row-major with even K and an even row stride (each pair one aligned-enough word)
  static bool direct(const Elem* a, int64_t as0, int64_t as1, int64_t k) {
    return as1 == 1 && k % 2 == 0 && as0 % 2 == 0 && reinterpret_cast<uintptr_t>(a) % 4 == 0;
  }
  // unit p (rows 2p, 2p + 1 of b; past K: zeros) of columns col .. col + 31 of a row-major b:
  // columns col .. col + 15 in lo, the next 16 in hi
  static void row_units(const BSource& b, int64_t k, int64_t p, int64_t col, int64_t nc, __m512i& lo, __m512i& hi) {
    const __mmask32 m = tail_mask32(nc);
    interleave32(b.load32(2 * p, col, m), 2 * p + 1 < k ? b.load32(2 * p + 1, col, m) : _mm512_setzero_si512(), lo, hi);
  }
  // units p0 .. p0 + 15 of w's `row` (b = w^T: b's column), 16 words (past K: zeros)
  static __m512i col_units(const BSource& w, int64_t k, int64_t row, int64_t p0) {
    return w.load32(row, 2 * p0, tail_mask32(k - 2 * p0));
  }
  // units p0 .. p1 of a packed as a^T: out[p * ld + i] = (a[i][2p], a[i][2p + 1]) for all m rows
  // (odd K: the last pair's second half 0). A transposed a (s_i == 1, e.g. dY^T) interleaves two
  // contiguous rows of the tensor under it, 16 words at a time.
  static void pack_a(const Elem* a, int64_t s_i, int64_t s_k, int64_t m, int64_t k, int64_t p0, int64_t p1, int64_t ld, Word* out) {
    for (int64_t p = p0; p < p1; ++p) {
      Word* o = out + p * ld;
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
  // acc += a's unit x (broadcast) . b's 16 columns, pairwise (vdpbf16ps)
  static __m512 madd(__m512 acc, const Word* x, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(*x)), (__m512bh)b);
  }
};
#endif

struct F32Format {
  using Elem = float;
  using Word = float;
  static constexpr int kPer = 1;
  // in the b-shared order, a (when not read in place) packed tile by tile by the thread that
  // computes the tile (pack_tile), into its own scratch
  static constexpr bool kTilePack = true;
  static int64_t units(int64_t k) { return k; }
  // a read in place: row-major, but not at a row stride of a multiple of 4 KB (K = 1024): a tile's
  // 12 rows would then meet in one L1 set (8 ways) at every unit and evict each other (such GEMMs
  // ran at 186-191 GFLOP/s in place, against 200-220 for oneDNN)
  static bool direct(const Elem*, int64_t as0, int64_t as1, int64_t) { return as1 == 1 && as0 % kAliasStride != 0; }
  static constexpr int64_t kAliasStride = 1024;
  static void row_units(const BSource& b, int64_t, int64_t p, int64_t col, int64_t nc, __m512i& lo, __m512i& hi) {
    lo = _mm512_castps_si512(b.load16f(p, col, tail_mask(nc)));
    hi = _mm512_castps_si512(b.load16f(p, col + 16, tail_mask(std::max<int64_t>(nc - 16, 0))));
  }
  static __m512i col_units(const BSource& w, int64_t k, int64_t row, int64_t p0) {
    return _mm512_castps_si512(w.load16f(row, p0, tail_mask(k - p0)));
  }
  // out[p * ld + i] = a[i][p] for units p0 .. p1 (of k) and all m rows (ld >= m rounded up to 16;
  // rows past m: 0). A transposed a (s_i == 1) copies rows of the tensor under it; a row-major one
  // goes through 16 x 16 transposes.
  static void pack_a(const Elem* a, int64_t s_i, int64_t s_k, int64_t m, int64_t k, int64_t p0, int64_t p1, int64_t ld, Word* out) {
    if (s_k == 1 && s_i != 1) {
      for (int64_t i0 = 0; i0 < m; i0 += 16) {
        for (int64_t q = p0; q < p1; q += 16) {
          const __mmask16 lanes = tail_mask(std::min(p1, k) - q);
          __m512i r[16];
          for (int i = 0; i < 16; ++i)
            r[i] = i0 + i < m ? _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes, a + (i0 + i) * s_i + q)) : _mm512_setzero_si512();
          transpose16(r);  // r[j]: unit q + j of rows i0 .. i0 + 15
          for (int64_t j = 0; j < std::min<int64_t>(p1 - q, 16); ++j) _mm512_storeu_si512(out + (q + j) * ld + i0, r[j]);
        }
      }
      return;
    }
    for (int64_t p = p0; p < p1; ++p) {
      Word* o = out + p * ld;
      if (s_i == 1) {
        const float* r = a + p * s_k;
        for (int64_t i = 0; i < m; i += 16) _mm512_mask_storeu_ps(o + i, tail_mask(m - i), _mm512_maskz_loadu_ps(tail_mask(m - i), r + i));
      } else {
        for (int64_t i = 0; i < m; ++i) o[i] = a[i * s_i + p * s_k];
      }
    }
  }
  // Rows i0 .. i0 + mr (mr <= kMr) of a, units 0 .. kl, packed as out[p * kMr + i] (rows past mr: 0),
  // 48 contiguous bytes per unit. out has kl * kMr + 16 words (each unit is written with a
  // 16-lane store, the next unit's store overwriting the 4 lanes past it).
  static void pack_tile(const Elem* a, int64_t s_i, int64_t s_k, int64_t mr, int64_t kl, Word* out) {
    if (s_i == 1) {  // a^T of a row-major tensor: each unit's rows are contiguous
      const __mmask16 rows = tail_mask(mr);
      for (int64_t p = 0; p < kl; ++p) _mm512_storeu_ps(out + p * kMr, _mm512_maskz_loadu_ps(rows, a + p * s_k));
    } else if (s_k == 1) {  // row-major: 16 x 16 transposes
      for (int64_t p0 = 0; p0 < kl; p0 += 16) {
        const __mmask16 lanes = tail_mask(kl - p0);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = i < mr ? _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes, a + i * s_i + p0)) : _mm512_setzero_si512();
        transpose16(r);  // r[j]: unit p0 + j of the rows
        for (int64_t j = 0; j < std::min<int64_t>(kl - p0, 16); ++j) _mm512_storeu_si512(out + (p0 + j) * kMr, r[j]);
      }
    } else {
      for (int64_t p = 0; p < kl; ++p)
        for (int64_t i = 0; i < kMr; ++i) out[p * kMr + i] = i < mr ? a[i * s_i + p * s_k] : 0.0f;
    }
  }
  static __m512 madd(__m512 acc, const Word* x, __m512i b) { return _mm512_fmadd_ps(_mm512_set1_ps(*x), _mm512_castsi512_ps(b), acc); }
};

// Panels lo .. hi of plain b into out + (panel - lo) * ps, units p_lo .. p_hi of K (unit p at
// p - k0: a block of K starting at unit k0). Walked unit by unit across the panels: each row is read
// once, in order (a walk down one panel's 32 columns would meet every row's line at the row stride).
template <typename Fmt>
void pack_b_rows(const BSource& b, int64_t k, int64_t n, int64_t lo, int64_t hi, int64_t ps, u32* out, int64_t p_lo, int64_t p_hi,
                 int64_t k0) {
  for (int64_t p = p_lo; p < p_hi; ++p) {
    for (int64_t panel = lo; panel < hi; ++panel) {
      const int64_t n0 = panel * kNr;
      u32* o = out + (panel - lo) * ps + (p - k0) * kNr;
      __m512i v0, v1;  // (columns past n: zero words)
      Fmt::row_units(b, k, p, n0, std::min<int64_t>(kNr, n - n0), v0, v1);
      _mm512_storeu_si512(o, v0);
      _mm512_storeu_si512(o + 16, v1);
    }
  }
}

// Panel of transposed b (b[k][n] = w[n][k], i.e. b = w^T for a row-major w (N, K)): columns n0 ..
// n0 + nc (nc <= 32), units k0 .. k0 + kl of K (k0 a multiple of 16). Unit p of column n is word p
// of w's row n.
template <typename Fmt>
void pack_b_cols(const BSource& w, int64_t k, int64_t n0, int64_t nc, u32* out, int64_t k0, int64_t kl) {
  for (int64_t g = 0; g < 2; ++g) {  // two groups of 16 columns
    const int64_t c0 = g * 16, cn = std::min<int64_t>(std::max<int64_t>(nc - c0, 0), 16);
    for (int64_t p0 = 0; p0 < kl; p0 += 16) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) r[c] = c < cn ? Fmt::col_units(w, k, n0 + c0 + c, k0 + p0) : _mm512_setzero_si512();
      transpose16(r);  // r[j]: unit k0 + p0 + j of the 16 columns
      const int64_t np = std::min<int64_t>(kl - p0, 16);
      for (int j = 0; j < np; ++j) _mm512_storeu_si512(out + (p0 + j) * kNr + c0, r[j]);
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

// Lanes of the block's two 16-column halves.
inline void half_masks(int64_t nc, __mmask16 (&m)[2]) { m[0] = tail_mask(nc), m[1] = tail_mask(std::max<int64_t>(nc - 16, 0)); }

// out (T: fp32, or bf16 rounded once) = sums (+ bias of out's dtype): the plain GEMM.
template <typename T>
struct Store {
  T* out;
  int64_t ld;
  const T* bias;  // or null
  void prefetch(int64_t i, int64_t n0) const { prefetch_lines(out + i * ld + n0, kNr * sizeof(T), true); }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    __mmask16 m[2];
    half_masks(nc, m);
    for (int h = 0; h < 2; ++h) {
      if (!m[h]) continue;
      const __m512 b = bias != nullptr ? load16(bias + n0 + 16 * h, m[h]) : _mm512_setzero_ps();
      for (int i = 0; i < MR; ++i) store16(out + (i0 + i) * ld + n0 + 16 * h, bias != nullptr ? _mm512_add_ps(acc[i][h], b) : acc[i][h], m[h]);
    }
  }
};

// out (T) = relu(sums + fp32 bias) (the fc layer; as bias_relu_).
template <typename T>
struct BiasRelu {
  T* out;
  int64_t ld;
  const float* bias;
  void prefetch(int64_t i, int64_t n0) const { prefetch_lines(out + i * ld + n0, kNr * sizeof(T), true); }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    __mmask16 m[2];
    half_masks(nc, m);
    for (int h = 0; h < 2; ++h) {
      if (!m[h]) continue;
      const __m512 b = _mm512_maskz_loadu_ps(m[h], bias + n0 + 16 * h);
      for (int i = 0; i < MR; ++i)
        store16(out + (i0 + i) * ld + n0 + 16 * h, _mm512_max_ps(_mm512_add_ps(acc[i][h], b), _mm512_setzero_ps()), m[h]);
    }
  }
};

// out fp32 = res + dropout(sums + fp32 bias) with dropout.cpp's keep mask over the flat index
// row * N + column (the residual stream after proj and mlp_proj; as bias_dropout_add_).
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
    __mmask16 m[2];
    half_masks(nc, m);
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

// out fp32 = sums where the packed mask's bit is set, else 0 (a weight gradient masked, Eq. 4), and
// the sum of squares of what is kept in blocks of kSumRows rows x 16 columns: 16 fp32 lanes over the
// block's rows in order, reduced (_mm512_reduce_add_ps) into block[row block][16-column block]; the
// caller adds the blocks in order in double (masks.cpp's apply_masks_sq_norms_ order, bit for bit,
// whatever the thread count).
struct MaskedGrad {
  float* out;
  int64_t ld;
  const u32* words;  // (M, ceil(N / 32)): one word per row per 32-column panel
  int64_t wpr;
  float* block;      // (ceil(M / kSumRows), ceil(N / 16))
  int64_t blocks_per_row;
  void prefetch(int64_t i, int64_t n0) const { prefetch_lines(out + i * ld + n0, 128, true); }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    __mmask16 m[2];
    half_masks(nc, m);
    __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int i = 0; i < MR; ++i) {
      const u32 w = words[(i0 + i) * wpr + n0 / kNr];
      float* o = out + (i0 + i) * ld + n0;
      for (int h = 0; h < 2; ++h) {
        const __m512 v = _mm512_maskz_mov_ps(static_cast<__mmask16>(w >> (16 * h)) & m[h], acc[i][h]);
        _mm512_mask_storeu_ps(o + 16 * h, m[h], v);
        sum[h] = _mm512_fmadd_ps(v, v, sum[h]);
      }
    }
    for (int h = 0; h < 2; ++h)
      if (m[h]) block[(i0 / kSumRows) * blocks_per_row + n0 / 16 + h] = _mm512_reduce_add_ps(sum[h]);
  }
};

// out (T) = sums where the ReLU's output z (T, like out) is > 0, else 0 (its backward: dz from the
// next layer's dx GEMM), and the kept values' column sums over the block's kSumRows rows (in order,
// from +0, from the unrounded values) into group[row block][column]; the caller adds the groups in
// order (the fc bias gradient; epilogues.cpp's bias_relu_backward_ order, bit for bit).
template <typename T>
struct ReluGrad {
  T* out;
  const T* z;
  int64_t ld;
  float* group;  // (ceil(M / kSumRows), ld)
  void prefetch(int64_t i, int64_t n0) const {
    prefetch_lines(out + i * ld + n0, kNr * sizeof(T), true);
    prefetch_lines(z + i * ld + n0, kNr * sizeof(T), false);
  }
  template <int MR>
  void operator()(__m512 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    __mmask16 m[2];
    half_masks(nc, m);
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
      _mm512_mask_storeu_ps(group + (i0 / kSumRows) * ld + n0 + 16 * h, m[h], sum);
    }
  }
};

// Block (i0, n0) of the output: sum_p a_unit(i, p) . bp[p] for i < MR, handed to the epilogue. a's
// units: packed (kPacked: a_unit(i, p) = a[p * as + i]) or straight from a row-major a (a[i * as +
// p]). The latter's rows are reached from four row pointers (rows 0, 3, 6, 9) plus 0, 1 or 2 row
// strides, so the loop advances 4 pointers instead of one per row (which left too few registers and
// spilled). The lines the epilogue will write (and read) are prefetched first (the epilogue meets
// them thousands of cycles later); `next` (or null): the next tile's kMr rows of a row-major a,
// prefetched a line per row every 16 units while this block computes.
template <typename Fmt, int MR, typename Epi, bool kPacked>
void micro(int64_t kp, const typename Fmt::Word* a, int64_t as, const u32* bp, const Epi& epi, int64_t i0, int64_t n0, int64_t nc, int tid,
           const typename Fmt::Word* next, const float* cin, int64_t ldc) {
  using Word = typename Fmt::Word;
  __m512 acc[MR][2];
  if (cin == nullptr) {
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  } else {  // the sums of the K blocks before this one (rows i0 .., columns n0 .. of cin)
    __mmask16 m[2];
    half_masks(nc, m);
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) acc[i][h] = _mm512_maskz_loadu_ps(m[h], cin + (i0 + i) * ldc + n0 + 16 * h);
  }
  for (int i = 0; i < MR; ++i) epi.prefetch(i0 + i, n0);
  const Word* g[4];
  for (int q = 0; q < 4; ++q) g[q] = kPacked ? a + 3 * q : a + 3 * q * as;
  for (int64_t p = 0; p < kp; ++p) {
    if (next != nullptr && (p & 15) == 0)
      for (int i = 0; i < kMr; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * as + p), _MM_HINT_T0);
    const __m512i b0 = _mm512_loadu_si512(bp + p * kNr);
    const __m512i b1 = _mm512_loadu_si512(bp + p * kNr + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const Word* x = kPacked ? g[i / 3] + i % 3 : g[i / 3] + (i % 3) * as;
      acc[i][0] = Fmt::madd(acc[i][0], x, b0);
      acc[i][1] = Fmt::madd(acc[i][1], x, b1);
    }
    for (int q = 0; q < 4; ++q) g[q] += kPacked ? as : 1;
  }
  epi(acc, i0, n0, nc, tid);
}

template <typename Fmt, typename Epi, bool kPacked, int MR = kMr>
void micro_rows(int64_t mr, int64_t kp, const typename Fmt::Word* a, int64_t as, const u32* bp, const Epi& epi, int64_t i0, int64_t n0,
                int64_t nc, int tid, const typename Fmt::Word* next, const float* cin, int64_t ldc) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro<Fmt, MR, Epi, kPacked>(kp, a, as, bp, epi, i0, n0, nc, tid, next, cin, ldc);
    return micro_rows<Fmt, Epi, kPacked, MR - 1>(mr, kp, a, as, bp, epi, i0, n0, nc, tid, next, cin, ldc);
  }
}

// One OpenMP region per GEMM: packing, a barrier, then the tiles. a, when it needs packing, is
// packed whole (the threads split its units). Then one of two loop orders; the operand read again
// and again is the smaller one, so it stays in cache:
// * b-shared: every panel of b packed once, then the threads split the row tiles; each tile meets
//   every panel. The threads split the packing by the rows of the memory under b: a row-major b
//   by units of K, a transposed b (W^T) by panels (W's rows), alongside a's units.
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
template <typename W>
inline void drop_lines(const W* p, int64_t words) {
  static_assert(sizeof(W) == 4, "packed words are 32-bit");
  const char* end = reinterpret_cast<const char*>(p + words);
  for (const char* c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63)); c < end; c += 64) {
#if defined(__CLFLUSHOPT__)
    _mm_clflushopt(const_cast<char*>(c));
#else
    _mm_clflush(c);
#endif
  }
}

// fp32 b in blocks of at most kBlockUnits of K: a packed panel is then at most 64 KB and all of b's
// panels for the model's N = 256 at most 512 KB, within a Zen 4 core's 1 MB L2 (K = 1024 whole:
// 1 MB, thrown out of L2 by the streams of a: those GEMMs ran at 182-186 GFLOP/s against 200-220
// for oneDNN). Each block's sums go through out (the epilogue's fp32 output) to the next: still
// one fp32 sum per output in k order, the same bits as one block. bf16 (half the bytes) takes all
// of K at once.
constexpr int64_t kBlockUnits = 512;

// out = epi(a b). `partial`: out's fp32 buffer (M, N), where the K blocks before the last leave
// their sums (null: one block).
template <typename Fmt, typename Epi>
void run(const Epi& epi, float* partial, const typename Fmt::Elem* a, int64_t as0, int64_t as1, const BSource& b, bool b_rows, int64_t m,
         int64_t k, int64_t n, int threads) {
  using Word = typename Fmt::Word;
  const int64_t kp = Fmt::units(k);
  const int64_t panels = (n + kNr - 1) / kNr, tiles = (m + kMr - 1) / kMr;
  const bool a_direct = Fmt::direct(a, as0, as1, k);
  // K blocks of kc units (a multiple of 16: the transposed packing takes 16 units at a time)
  const int64_t blocks = partial == nullptr ? 1 : (kp + kBlockUnits - 1) / kBlockUnits;
  const int64_t kc = blocks == 1 ? kp : ((kp + blocks - 1) / blocks + 15) / 16 * 16;
  // packed panels lie ps words apart: past the kc * 32 words of a panel, 16 more, so that the
  // panels' starts do not all fall in one L1 set
  const int64_t ps = kc * kNr + 16;
  auto pack_panels = [&](int64_t lo, int64_t hi, u32* dst, int64_t k0, int64_t kl) {  // panels lo .. hi into dst, ps apart
    if (b_rows) return pack_b_rows<Fmt>(b, k, n, lo, hi, ps, dst, k0, k0 + kl, k0);
    for (int64_t panel = lo; panel < hi; ++panel)
      pack_b_cols<Fmt>(b, k, panel * kNr, std::min<int64_t>(kNr, n - panel * kNr), dst + (panel - lo) * ps, k0, kl);
  };
  // the packed rows' stride: a multiple of 16 words (whole vectors) that is not a power of two (a
  // tile's units at a power-of-two stride would all fall in one L1 set)
  const int64_t ld_pack = (m + 15) / 16 * 16 + 16;
  const bool b_shared =
      (panels * kp * kNr <= tiles * kp * kMr || ((a_direct || Fmt::kTilePack) && tiles >= kSharedTiles)) && tiles >= threads;
  // (a transposed a, e.g. dY^T, is packed whole: its rows are read whole and in order that way)
  const bool tile_pack = Fmt::kTilePack && !a_direct && as1 == 1 && b_shared;
  Word* apack = a_direct || tile_pack ? nullptr : scratch<Word>(0, kc * ld_pack);  // the caller's scratch, read by every thread
  const Store<float> carry{partial, n, nullptr};  // a block's sums, for the next
  // The block (tile t, panel) over units k0 .. k0 + kl; tp: the tile's rows of a packed by the
  // thread (tile_pack), or null. fetch_next: the tile's block is the first to read its rows of a (a
  // row-major a only: a packed a's next tile mostly shares this one's lines), so it prefetches the
  // next full tile's rows.
  auto tile = [&](int64_t t, int64_t panel, const u32* bp, int tid, bool fetch_next, int64_t k0, int64_t kl, const Word* tp) {
    const int64_t i0 = t * kMr, mr = std::min<int64_t>(kMr, m - i0), n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
    const float* cin = k0 == 0 ? nullptr : partial;
    auto go = [&](const auto& e) {
      using E = std::decay_t<decltype(e)>;
      if (tp != nullptr) {
        micro_rows<Fmt, E, true>(mr, kl, tp, kMr, bp, e, i0, n0, nc, tid, nullptr, cin, n);
      } else if (apack == nullptr) {
        const Word* rows = reinterpret_cast<const Word*>(a + i0 * as0) + k0;
        const Word* next = fetch_next && i0 + 2 * kMr <= m ? rows + kMr * (as0 / Fmt::kPer) : nullptr;
        micro_rows<Fmt, E, false>(mr, kl, rows, as0 / Fmt::kPer, bp, e, i0, n0, nc, tid, next, cin, n);
      } else {
        micro_rows<Fmt, E, true>(mr, kl, apack + i0, ld_pack, bp, e, i0, n0, nc, tid, nullptr, cin, n);
      }
    };
    if (k0 + kl == kp)
      go(epi);
    else
      go(carry);
  };
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
    const bool shared = apack != nullptr || b_shared;
    int64_t lo, hi;
    for (int64_t k0 = 0; k0 < kp; k0 += kc) {
      const int64_t kl = std::min(kc, kp - k0);
      if (k0 > 0 && nt > 1 && shared) {  // every thread is done with the previous block's packed operands
#pragma omp barrier
      }
      if (apack != nullptr) {
        share(kl, tid, nt, lo, hi);
        Fmt::pack_a(a + k0 * Fmt::kPer * as1, as0, as1, m, k - k0 * Fmt::kPer, lo, hi, ld_pack, apack);
      }
      if (b_shared && b_rows) {  // (all panels, this thread's units of the block)
        share(kl, tid, nt, lo, hi);
        pack_b_rows<Fmt>(b, k, n, 0, panels, ps, bp_all, k0 + lo, k0 + hi, k0);
      } else if (b_shared) {
        share(panels, tid, nt, lo, hi);
        pack_panels(lo, hi, bp_all + lo * ps, k0, kl);
      }
      if (nt > 1 && shared) {
#pragma omp barrier
      }
      if (b_shared) {
        share(tiles, tid, nt, lo, hi);
        for (int64_t t = lo; t < hi; ++t) {
          Word* tp = nullptr;
          if constexpr (Fmt::kTilePack) {
            if (tile_pack) {
              tp = scratch<Word>(1, kc * kMr + 16);
              Fmt::pack_tile(a + t * kMr * as0 + k0 * as1, as0, as1, std::min<int64_t>(kMr, m - t * kMr), kl, tp);
            }
          }
          for (int64_t panel = 0; panel < panels; ++panel) tile(t, panel, bp_all + panel * ps, tid, panel == 0 && t + 1 < hi, k0, kl, tp);
        }
      } else {
        share(panels * row_splits, tid, nt, lo, hi);
        if (lo < hi) {  // this thread's panels, packed all at once into its own scratch
          const int64_t p_lo = lo / row_splits, p_hi = (hi - 1) / row_splits + 1;
          u32* bp = scratch<u32>(2, (p_hi - p_lo) * ps);
          pack_panels(p_lo, p_hi, bp, k0, kl);
          if (row_splits == 1) {
            // groups of panels that stay in L2 together, each group row tile by row tile: a tile's
            // rows are written group-wide and read once per group (a walk down one panel at a time
            // writes the output in 64-byte strips at the row stride, which N = 1024 makes 2 KB: a
            // few L1 sets for the whole strip)
            const int64_t group = std::max<int64_t>(1, kGroupBytes / (ps * 4));
            for (int64_t g0 = p_lo; g0 < p_hi; g0 += group)
              for (int64_t t = 0; t < tiles; ++t)
                for (int64_t panel = g0; panel < std::min(g0 + group, p_hi); ++panel)
                  tile(t, panel, bp + (panel - p_lo) * ps, tid, panel == g0, k0, kl, nullptr);
          } else {
            for (int64_t w = lo; w < hi; ++w) {
              const int64_t panel = w / row_splits, split = w % row_splits;
              const int64_t t_lo = tiles * split / row_splits, t_hi = tiles * (split + 1) / row_splits;
              for (int64_t t = t_lo; t < t_hi; ++t) tile(t, panel, bp + (panel - p_lo) * ps, tid, t + 1 < t_hi, k0, kl, nullptr);
            }
          }
        }
      }
      if (drop_shared && nt == 2) {  // the other thread's share of the packing, as split above
#pragma omp barrier
        const int other = 1 - tid;
        if (b_shared && b_rows) {
          share(kl, other, nt, lo, hi);
          for (int64_t panel = 0; panel < panels; ++panel) drop_lines(bp_all + panel * ps + lo * kNr, (hi - lo) * kNr);
        } else if (b_shared) {
          share(panels, other, nt, lo, hi);
          drop_lines(bp_all + lo * ps, (hi - lo) * ps);
        }
        if (apack != nullptr) {
          share(kl, other, nt, lo, hi);
          drop_lines(apack + lo * ld_pack, (hi - lo) * ld_pack);
        }
        _mm_sfence();
      }
    }
  }
}

// a and b as the kernel reads them: each with a unit stride (else copied), strides normalized for
// one-row / one-column views; the threads to use.
template <typename Fmt>
struct Operands {
  at::Tensor a, b, mask;
  const typename Fmt::Elem* ap;
  BSource src;
  bool b_rows;  // b row-major (packed by units of rows) or transposed (by 16 x 16 blocks)
  int64_t as0, as1, m, k, n;
  int threads;
  // b of a's dtype, or fp32 (for bf16 rounded as packed) with optional packed mask bits over the
  // rows of the matrix under b (b itself when row-major, b^T when transposed)
  Operands(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& b_mask = at::Tensor())
      : a(a_in.stride(0) == 1 || a_in.stride(1) == 1 ? a_in : a_in.contiguous()),
        b(b_in.stride(0) == 1 || b_in.stride(1) == 1 ? b_in : b_in.contiguous()),
        mask(b_mask.defined() ? b_mask.contiguous() : b_mask) {
    ap = reinterpret_cast<const typename Fmt::Elem*>(a.data_ptr());
    m = a.size(0), k = a.size(1), n = b.size(1);
    as0 = a.stride(0), as1 = a.stride(1);
    int64_t bs0 = b.stride(0), bs1 = b.stride(1);
    if (as1 != 1 && k == 1) as1 = 1;            // one column: any row stride reads in place
    if (!mask.defined()) {  // (with a mask, b stays W or W^T: the mask's rows are W's)
      if (bs1 != 1 && n == 1) bs1 = 1;  // one column of b: a row-major (K, 1) with row stride bs0
      if (bs1 != 1 && k == 1) bs1 = 1, bs0 = n;
    }
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
  // partial: out's fp32 buffer for the sums of K blocks (null: all of K at once)
  template <typename Epi>
  void run(const Epi& epi, float* partial = nullptr) const {
    harmodt::run<Fmt>(epi, partial, ap, as0, as1, src, b_rows, m, k, n, threads);
  }
};

// The GEMM with its epilogue fused, Fmt's operands, T the dtype of the plain and ReLU outputs.
template <typename Fmt, typename T>
std::tuple<at::Tensor, at::Tensor> gemm_epilogue_impl(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind, const at::Tensor& bias,
                                                      const at::Tensor& residual, const at::Tensor& mask, int64_t seed, double p,
                                                      const at::Tensor& b_mask) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool t_out = kind == GemmEpilogue::kBiasRelu || kind == GemmEpilogue::kReluGrad;
  at::Tensor out = at::empty({m, n}, a.options().dtype(t_out ? c10::CppTypeToScalarType<T>::value : at::kFloat));
  at::Tensor sq = epilogue_sums(kind, n, a.options());
  if (m == 0 || n == 0) return {out, sq};
  if (k == 0) {  // sums of nothing: 0 (through the same epilogue below, from a one-column zero product)
    const at::Tensor z = at::zeros({m, 1}, a.options()), zb = at::zeros({1, n}, a.options());
    return gemm_epilogue_impl<Fmt, T>(z, zb, kind, bias, residual, mask, seed, p, at::Tensor());
  }
  const Operands<Fmt> ops(a, b, b_mask);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  const at::Tensor res_ = residual.defined() ? residual.contiguous() : residual;
  const int64_t row_blocks = (m + kSumRows - 1) / kSumRows;
  // fp32: K in blocks, their sums through out (fp32 for every epilogue then)
  float* partial = std::is_same_v<Fmt, F32Format> ? out.data_ptr<float>() : nullptr;
  switch (kind) {
    case GemmEpilogue::kBiasRelu:
      ops.run(BiasRelu<T>{out.data_ptr<T>(), n, bias_.data_ptr<float>()}, partial);
      break;
    case GemmEpilogue::kBiasDropoutAdd:
      ops.run(BiasDropoutAdd{out.data_ptr<float>(), res_.data_ptr<float>(), n, bias_.data_ptr<float>(), static_cast<uint64_t>(seed),
                             static_cast<uint32_t>(std::llround(p * 65536.0)), static_cast<float>(1.0 / (1.0 - p))},
              partial);
      break;
    case GemmEpilogue::kReluGrad: {
      float* group = scratch<float>(3, static_cast<size_t>(row_blocks * n));  // (the caller's thread's: the workers only write it)
      ops.run(ReluGrad<T>{out.data_ptr<T>(), res_.data_ptr<T>(), n, group}, partial);
      float* total = sq.data_ptr<float>();
      for (int64_t g = 0; g < row_blocks; ++g)
        for (int64_t j = 0; j < n; ++j) total[j] += group[g * n + j];
      break;
    }
    case GemmEpilogue::kMaskedGrad: {
      const int64_t per_row = (n + 15) / 16;
      std::vector<float> block(static_cast<size_t>(row_blocks * per_row));
      const at::Tensor words = mask.contiguous();
      ops.run(MaskedGrad{out.data_ptr<float>(), n, reinterpret_cast<const u32*>(words.data_ptr<int32_t>()), words.size(1), block.data(), per_row},
              partial);
      double total = 0.0;
      for (float v : block) total += static_cast<double>(v);
      sq.fill_(total);
      break;
    }
  }
  return {out, sq};
}

}  // namespace
#endif  // HARMODT_AVX512_GEMM

// out (M, N) contiguous bf16; a (M, K) bf16, b (K, N) bf16 or fp32 (rounded to bf16 as it is
// packed, through b_mask's bits if given: see Operands), each with a unit stride in some dim (else
// copied); bias: undefined or bf16 (N,), added to every row before the rounding.
void bf16_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& b_mask) {
  TORCH_CHECK(bf16_gemm_available(), "gemm: the native bf16 GEMM needs AVX512-BF16 (this build or CPU lacks it)");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && (b.scalar_type() == at::kBFloat16 || b.scalar_type() == at::kFloat),
              "bf16_gemm_out: a must be bf16 and b bf16 or fp32");
#if defined(HARMODT_BF16_GEMM)
  if (!native_gemm_out_needs_product(out, a, b, bias, at::kBFloat16, "bf16_gemm_out")) return;
  const int64_t n = b.size(1);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  Operands<Bf16Format>(a, b, b_mask).run(Store<c10::BFloat16>{out.data_ptr<c10::BFloat16>(), n, bias.defined() ? bias_.data_ptr<c10::BFloat16>() : nullptr});
#endif
}

// The GEMM with its epilogue fused (gemm.cpp's gemm_epilogue op checks the arguments): a (M, K), b
// (K, N) bf16; bias fp32 (N,); residual fp32 contiguous (M, N); mask int32 (M, ceil(N / 32)).
std::tuple<at::Tensor, at::Tensor> bf16_gemm_epilogue(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind,
                                                      const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& mask,
                                                      int64_t seed, double p, const at::Tensor& b_mask) {
  TORCH_CHECK(bf16_gemm_available(), "gemm_epilogue: the native bf16 GEMM needs AVX512-BF16 (this build or CPU lacks it)");
#if defined(HARMODT_BF16_GEMM)
  return gemm_epilogue_impl<Bf16Format, c10::BFloat16>(a, b, kind, bias, residual, mask, seed, p, b_mask);
#else
  return {};
#endif
}

#if defined(HARMODT_AVX512_GEMM)
// fp32: out (M, N) contiguous = a (M, K) b (K, N) (+ fp32 bias), b optionally through b_mask's bits.
void f32_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& b_mask) {
  TORCH_CHECK(f32_gemm_available(), "gemm: the native fp32 GEMM needs AVX-512 (BW, DQ, VL), which this CPU lacks");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "f32_gemm_out: a and b must be float32");
  if (!native_gemm_out_needs_product(out, a, b, bias, at::kFloat, "f32_gemm_out")) return;
  const int64_t n = b.size(1);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  Operands<F32Format>(a, b, b_mask).run(Store<float>{out.data_ptr<float>(), n, bias.defined() ? bias_.data_ptr<float>() : nullptr},
                                        out.data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor> f32_gemm_epilogue(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind, const at::Tensor& bias,
                                                     const at::Tensor& residual, const at::Tensor& mask, int64_t seed, double p,
                                                     const at::Tensor& b_mask) {
  TORCH_CHECK(f32_gemm_available(), "gemm_epilogue: the native fp32 GEMM needs AVX-512 (BW, DQ, VL), which this CPU lacks");
  return gemm_epilogue_impl<F32Format, float>(a, b, kind, bias, residual, mask, seed, p, b_mask);
}
#endif

}  // namespace harmodt
