// fp32 GEMM on AVX2 + FMA (CPUs without AVX-512: AMD Zen 2/3, Intel before Skylake-X):
// out (M, N) = a (M, K) b (K, N) (+ bias), fp32 operands and accumulation, with the training
// block's epilogues fused into the output tiles.
//
// Why our own: where oneDNN's matmul does not run (PyTorch 2.13 refuses CPUs without AVX-512 even
// for fp32), the block GEMMs went to MKL's sgemm, which on this project's 2-core AMD Zen 3 machines
// ran the model's shapes (M ~600 rows, K and N 256-1024) at 100-129 GFLOP/s, 55-70 % of the FMA
// peak (~187 GFLOP/s on both cores). The shapes are few and alike, so one register-blocked kernel
// covers them, and owning it lets the masking ride along:
//
// * b may be a weight W or W^T seen through its task's packed mask bits (over W's rows): the mask
//   is applied while b is packed, so a masked layer needs no W * M buffer (the user's design: the
//   mask applied on the fly, N masked weight copies never materialized).
// * b is packed per panel of kNr = 16 columns: for each k, the panel's 16 values side by side
//   (64 bytes). A plain b copies row segments; a transposed b (the forward's W^T) transposes 8 x 8
//   blocks.
// * a is read in place when its rows are contiguous (a row-major activation): each micro-tile
//   broadcasts a[i][k] from kMr row streams. Otherwise (the weight gradient's dy^T) it is packed
//   per tile of kMr rows as [k][kMr] first.
// * the micro-kernel keeps a kMr x 16 block of out in 2 * kMr ymm accumulators over the whole of K
//   (each output is one fp32 sum in k order, whatever M, N or the thread count: deterministic, and
//   no partial sums through memory), then hands it to the epilogue, which writes it once.
// * the threads split the column panels (each packs its own), or the row tiles when there are
//   fewer panels than threads.
//
// Without AVX2 + FMA at compile time (a portable build) or at run time, f32_gemm_available() is
// false and gemm.cpp keeps MKL. Built with AVX-512, this file is empty: gemm_avx512.cpp's fp32
// kernel provides the same entry points.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace harmodt {

// (With AVX-512, gemm_avx512.cpp's fp32 kernel stands in for this one: the same entry points.)
#if !defined(HARMODT_AVX512_GEMM)

#if defined(HARMODT_AVX2)
#define HARMODT_F32_GEMM 1
#endif

bool f32_gemm_available() {
#if defined(HARMODT_F32_GEMM)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#if defined(HARMODT_F32_GEMM)
namespace {

constexpr int kMr = 6;   // rows per micro-tile: 2 * kMr accumulators + 2 b registers + 1 broadcast of 16 ymm
static_assert(kMr == kSumRows, "the epilogues' sums are in common.h's kSumRows-row groups");
constexpr int kNr = 16;  // columns per panel (two ymm)

using u32 = uint32_t;


// The matrix under b: w (rows x ld), b = w (plain) or w^T (transposed); optional packed mask bits
// over w's rows (clear bit: +0).
struct BSource {
  const float* w = nullptr;
  const u32* bits = nullptr;  // (rows, wpr) words
  int64_t wpr = 0;
  int64_t ld = 0;  // w's row stride in elements

  // 8 values of w's `row` from column col (a multiple of 8), the first `cnt` only (the rest +0)
  __m256 load(int64_t row, int64_t col, int64_t cnt) const {
    const float* p = w + row * ld + col;
    if (cnt >= 8) {  // a whole vector: a plain load, the mask as an and (+0 where clear, whatever W holds there)
      const __m256 v = _mm256_loadu_ps(p);
      if (bits == nullptr) return v;
      return _mm256_and_ps(v, _mm256_castsi256_ps(bits8(bits[row * wpr + (col >> 5)] >> (col & 31))));
    }
    __m256i lanes = tail_mask8(cnt);
    if (bits != nullptr) lanes = _mm256_and_si256(lanes, bits8(bits[row * wpr + (col >> 5)] >> (col & 31)));
    return _mm256_maskload_ps(p, lanes);
  }
};

// Panels lo .. hi of plain b (b[k][n] = w[k][n], N columns) into out + (panel - lo) * ps, rows k0 .. k0 + k,
// walked row by row across the panels (each row of w is read once, in order).
void pack_b_rows(const BSource& b, int64_t k0, int64_t k, int64_t n, int64_t lo, int64_t hi, int64_t ps, float* out) {
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t panel = lo; panel < hi; ++panel) {
      const int64_t n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
      float* o = out + (panel - lo) * ps + r * kNr;
      _mm256_storeu_ps(o, b.load(k0 + r, n0, nc));
      _mm256_storeu_ps(o + 8, nc > 8 ? b.load(k0 + r, n0 + 8, nc - 8) : _mm256_setzero_ps());
    }
  }
}

// Panel of transposed b (b[k][n] = w[n][k]): columns n0 .. n0 + nc (nc <= 16), rows k0 .. k0 + k
// (k0 a multiple of 8: mask bits are read 8 at a time).
void pack_b_cols(const BSource& w, int64_t k_off, int64_t k, int64_t n0, int64_t nc, float* out) {
  for (int64_t g = 0; g < 2; ++g) {  // two groups of 8 columns
    const int64_t c0 = g * 8, cn = std::min<int64_t>(std::max<int64_t>(nc - c0, 0), 8);
    for (int64_t k0 = 0; k0 < k; k0 += 8) {
      const int64_t kc = std::min<int64_t>(k - k0, 8);
      __m256 r[8];
      for (int c = 0; c < 8; ++c) r[c] = c < cn ? w.load(n0 + c0 + c, k_off + k0, kc) : _mm256_setzero_ps();
      transpose8(r);  // r[j]: row k0 + j of the 8 columns
      for (int j = 0; j < kc; ++j) _mm256_storeu_ps(out + (k0 + j) * kNr + c0, r[j]);
    }
  }
}

// Tiles t0 .. t1 of a (a[i][k] = a + i * s_i + k * s_k) packed as [tile][k][kAp] (rows past the
// tile's: 0). kAp = 8 > kMr: each k's values are one full 8-lane store (masked stores are slow on
// AMD Zen), and the broadcasts never straddle a cache line.
constexpr int kAp = 8;
void pack_a(const float* a, int64_t s_i, int64_t s_k, int64_t m, int64_t k, int64_t t0, int64_t t1, float* out) {
  if (s_i == 1) {  // a^T row-major (the weight gradient's dy^T): each k's values are contiguous, and each
    // k's row of a^T is read once, in order, for all the tiles (tile by tile, every k would be a
    // new line at a^T's row stride)
    for (int64_t p = 0; p < k; ++p) {
      const float* src = a + p * s_k;
      int64_t t = t0;
      for (; t < t1 && t * kMr + kAp <= m; ++t) _mm256_storeu_ps(out + (t * k + p) * kAp, _mm256_loadu_ps(src + t * kMr));
      for (; t < t1; ++t) _mm256_storeu_ps(out + (t * k + p) * kAp, _mm256_maskload_ps(src + t * kMr, tail_mask8(m - t * kMr)));
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i0 = t * kMr, mr = std::min<int64_t>(kMr, m - i0);
    float* o = out + t * k * kAp;
    for (int64_t p = 0; p < k; ++p) {
      const float* src = a + i0 * s_i + p * s_k;
      for (int64_t i = 0; i < kAp; ++i) o[p * kAp + i] = i < mr ? src[i * s_i] : 0.0f;
    }
  }
}

// Out-of-range lanes of the last panel: lane masks for columns n0 .. n0 + nc of a 16-wide tile.
struct Lanes {
  __m256i m[2];
  bool full;
  explicit Lanes(int64_t nc) : m{tail_mask8(nc), tail_mask8(nc - 8)}, full(nc >= kNr) {}
};

inline void store_lanes(float* p, __m256 v, const Lanes& l, int h) {
  if (l.full)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, l.m[h], v);
}
inline __m256 load_lanes(const float* p, const Lanes& l, int h) { return l.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, l.m[h]); }

// out = acc (+ bias)
struct StoreF32 {
  float* out;
  int64_t ld;
  const float* bias;  // or null
  template <int MR>
  void operator()(__m256 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const Lanes l(nc);
    const int hs = nc > 8 ? 2 : 1;
    for (int h = 0; h < hs; ++h) {
      const __m256 b = bias != nullptr ? load_lanes(bias + n0 + 8 * h, l, h) : _mm256_setzero_ps();
      for (int i = 0; i < MR; ++i) {
        const __m256 v = bias != nullptr ? _mm256_add_ps(acc[i][h], b) : acc[i][h];
        store_lanes(out + (i0 + i) * ld + n0 + 8 * h, v, l, h);
      }
    }
  }
};

// relu(acc + bias) (the fc layer; as bias_relu_)
struct BiasReluF32 {
  float* out;
  int64_t ld;
  const float* bias;
  template <int MR>
  void operator()(__m256 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const Lanes l(nc);
    for (int h = 0; h < (nc > 8 ? 2 : 1); ++h) {
      const __m256 b = load_lanes(bias + n0 + 8 * h, l, h);
      for (int i = 0; i < MR; ++i)
        store_lanes(out + (i0 + i) * ld + n0 + 8 * h, _mm256_max_ps(_mm256_add_ps(acc[i][h], b), _mm256_setzero_ps()), l, h);
    }
  }
};

// residual + dropout(acc + bias) (proj, mlp_proj; as bias_dropout_add_: the keep mask of flat index
// row * ld + column)
struct BiasDropoutAddF32 {
  float* out;
  const float* res;
  int64_t ld;
  const float* bias;
  uint64_t seed;
  uint32_t threshold;  // round(p * 65536), <= 0xFFFF
  float scale;         // 1 / (1 - p)
  template <int MR>
  void operator()(__m256 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const Lanes l(nc);
    const __m256i thr = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
    const __m256 sc = _mm256_set1_ps(scale);
    const int hs = nc > 8 ? 2 : 1;
    __m256 b[2];
    for (int h = 0; h < hs; ++h) b[h] = load_lanes(bias + n0 + 8 * h, l, h);
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (i0 + i) * ld + n0;
      const uint32_t keep = threshold != 0 ? keep_bits16_at(seed, at, thr) : 0xFFFFu;  // the row's 16 columns
      for (int h = 0; h < hs; ++h) {
        __m256 d = _mm256_mul_ps(_mm256_add_ps(acc[i][h], b[h]), sc);
        if (threshold != 0) d = _mm256_and_ps(_mm256_castsi256_ps(bits8(keep >> (8 * h))), d);
        store_lanes(out + at + 8 * h, _mm256_add_ps(load_lanes(res + at + 8 * h, l, h), d), l, h);
      }
    }
  }
};

// acc * mask and its sum of squares (a weight gradient, Eq. 4): each tile's (kMr x 16) squares in 8
// fp32 lanes, rows in order, reduced as reduce_add16, into block[tile][panel]; the caller sums the
// blocks in double in that order (masks.cpp's apply_masks_sq_norms_ order on AVX2 builds, bit for bit)
struct MaskedGradF32 {
  float* out;
  int64_t ld;
  const u32* words;  // (M, ceil(N / 32))
  int64_t wpr;
  float* block;  // (tiles, panels)
  int64_t panels;
  template <int MR>
  void operator()(__m256 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const Lanes l(nc);
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const u32 w = words[(i0 + i) * wpr + (n0 >> 5)] >> (n0 & 31);
      for (int h = 0; h < (nc > 8 ? 2 : 1); ++h) {
        const __m256 v = _mm256_and_ps(_mm256_castsi256_ps(bits8(w >> (8 * h))), acc[i][h]);
        store_lanes(out + (i0 + i) * ld + n0 + 8 * h, v, l, h);
        sum = _mm256_fmadd_ps(v, v, sum);  // lanes past nc: acc is 0 there (b's packed tail is 0)
      }
    }
    block[(i0 / kMr) * panels + n0 / kNr] = reduce_add16(sum, _mm256_setzero_ps());
  }
};

// acc * (z > 0) and its column sums over the tile's rows (ReLU's backward and the fc bias
// gradient), into group[tile][column]; the caller adds the groups in order (epilogues.cpp's
// bias_relu_backward_ order, bit for bit)
struct ReluGradF32 {
  float* out;
  const float* z;
  int64_t ld;
  float* group;  // (tiles, ld)
  template <int MR>
  void operator()(__m256 (&acc)[MR][2], int64_t i0, int64_t n0, int64_t nc, int tid) const {
    const Lanes l(nc);
    for (int h = 0; h < (nc > 8 ? 2 : 1); ++h) {
      __m256 sum = _mm256_setzero_ps();
      for (int i = 0; i < MR; ++i) {
        const int64_t at = (i0 + i) * ld + n0 + 8 * h;
        const __m256 pos = _mm256_cmp_ps(load_lanes(z + at, l, h), _mm256_setzero_ps(), _CMP_GT_OQ);
        const __m256 v = _mm256_and_ps(pos, acc[i][h]);
        store_lanes(out + at, v, l, h);
        sum = _mm256_add_ps(sum, v);
      }
      store_lanes(group + (i0 / kMr) * ld + n0 + 8 * h, sum, l, h);
    }
  }
};

// The micro-kernel: an MR x 16 tile (MR <= kMr) of a b over all K. a: packed ([k][kMr]) or MR row
// streams (row i at a + i * lda). The accumulators are named variables, not an array: GCC keeps an
// array of __m256 (which may alias the float loads) in memory and stores it back at every k.
template <int MR, typename Epi>
void micro(int64_t k, const float* a, int64_t rs, int64_t step, const float* bp, const float* cin, int64_t ldc, const Epi& epi, int64_t i0,
           int64_t n0, int64_t nc, int tid) {
  static_assert(MR >= 1 && MR <= 6, "micro: 1 to 6 rows");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (cin != nullptr) {  // the sums of the previous K blocks (rows i0 .., columns n0 .. of cin)
    const Lanes l(nc);
    const float* c = cin + i0 * ldc + n0;
#define HARMODT_LOAD(i)                                                      \
  if constexpr (MR > i) {                                                    \
    c##i##0 = load_lanes(c + i * ldc, l, 0);                                 \
    if (nc > 8) c##i##1 = load_lanes(c + i * ldc + 8, l, 1);                 \
  }
    HARMODT_LOAD(0)
    HARMODT_LOAD(1)
    HARMODT_LOAD(2)
    HARMODT_LOAD(3)
    HARMODT_LOAD(4)
    HARMODT_LOAD(5)
#undef HARMODT_LOAD
  }
  const float* r0 = a;
  const float* r1 = a + (MR > 1 ? rs : 0);
  const float* r2 = a + (MR > 2 ? 2 * rs : 0);
  const float* r3 = a + (MR > 3 ? 3 * rs : 0);
  const float* r4 = a + (MR > 4 ? 4 * rs : 0);
  const float* r5 = a + (MR > 5 ? 5 * rs : 0);
#define HARMODT_ROW(i)                                    \
  if constexpr (MR > i) {                                 \
    const __m256 x = _mm256_broadcast_ss(r##i + p * step); \
    c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0);            \
    c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);            \
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(bp + p * kNr);
    const __m256 b1 = _mm256_loadu_ps(bp + p * kNr + 8);
    HARMODT_ROW(0)
    HARMODT_ROW(1)
    HARMODT_ROW(2)
    HARMODT_ROW(3)
    HARMODT_ROW(4)
    HARMODT_ROW(5)
  }
#undef HARMODT_ROW
  __m256 acc[MR][2];
  const __m256 all[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < MR; ++i) acc[i][0] = all[i][0], acc[i][1] = all[i][1];
  epi(acc, i0, n0, nc, tid);
}

template <typename Epi, int MR = kMr>
void micro_rows(int64_t mr, int64_t k, const float* a, int64_t rs, int64_t step, const float* bp, const float* cin, int64_t ldc,
                const Epi& epi, int64_t i0, int64_t n0, int64_t nc, int tid) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro<MR, Epi>(k, a, rs, step, bp, cin, ldc, epi, i0, n0, nc, tid);
    return micro_rows<Epi, MR - 1>(mr, k, a, rs, step, bp, cin, ldc, epi, i0, n0, nc, tid);
  }
}


constexpr double kSerialFlop = 2.0e6;        // below this, one thread
constexpr int64_t kGroupBytes = 256 * 1024;  // packed panels walked together over all row tiles (L2)
#ifndef HARMODT_F32_KC
#define HARMODT_F32_KC 320
#endif
constexpr int64_t kKc = HARMODT_F32_KC;  // most rows of b per K block: a packed panel of them (kKc x 16) stays in L1

// out = epi(a b) with `partial` (out's raw fp32 sums) writing the K blocks before the last: each
// output is still one sum in k order (an fp32 partial sum through memory is the same fp32 value).
template <typename Epi>
void run(const Epi& epi, const StoreF32& partial, const float* a, int64_t as0, int64_t as1, const BSource& b, bool b_rows, int64_t m,
         int64_t k, int64_t n, int threads) {
  const int64_t panels = (n + kNr - 1) / kNr, tiles = (m + kMr - 1) / kMr;
  const bool a_direct = as1 == 1;
  const int64_t blocks = (k + kKc - 1) / kKc;
  const int64_t kc = blocks == 1 ? k : ((k + blocks - 1) / blocks + 7) / 8 * 8;  // a multiple of 8 (mask bits by 8)
  const int64_t ps = kc * kNr + 16;  // panel stride in the packed b (floats)
  float* apack = a_direct ? nullptr : scratch<float>(0, static_cast<size_t>(tiles * kc * kAp));  // the caller's, read by every thread
  const int64_t row_splits = panels >= threads ? 1 : std::min<int64_t>(tiles, (threads + panels - 1) / panels);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t lo, hi;
    share(panels * row_splits, tid, nt, lo, hi);
    const int64_t p_lo = lo < hi ? lo / row_splits : 0, p_hi = lo < hi ? (hi - 1) / row_splits + 1 : 0;
    float* bp = lo < hi ? scratch<float>(2, static_cast<size_t>((p_hi - p_lo) * ps)) : nullptr;
    for (int64_t k0 = 0; k0 < k; k0 += kc) {
      const int64_t kl = std::min(kc, k - k0);
      const bool first = k0 == 0, last = k0 + kl == k;
      if (apack != nullptr) {
        if (!first && nt > 1) {  // every thread is done with the previous block's packed a
#pragma omp barrier
        }
        int64_t t_lo, t_hi;
        share(tiles, tid, nt, t_lo, t_hi);
        pack_a(a + k0 * as1, as0, as1, m, kl, t_lo, t_hi, apack);
        if (nt > 1) {
#pragma omp barrier
        }
      }
      if (lo >= hi) continue;
      // this thread's panels of the block, packed all at once into its own scratch
      if (b_rows)
        pack_b_rows(b, k0, kl, n, p_lo, p_hi, ps, bp);
      else
        for (int64_t panel = p_lo; panel < p_hi; ++panel)
          pack_b_cols(b, k0, kl, panel * kNr, std::min<int64_t>(kNr, n - panel * kNr), bp + (panel - p_lo) * ps);
      auto tile = [&](int64_t t, int64_t panel) {
        const int64_t i0 = t * kMr, mr = std::min<int64_t>(kMr, m - i0), n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
        const float* ap = apack != nullptr ? apack + t * kl * kAp : a + i0 * as0 + k0;
        const int64_t rs = apack != nullptr ? 1 : as0, step = apack != nullptr ? kAp : 1;
        const float* pb = bp + (panel - p_lo) * ps;
        const float* cin = first ? nullptr : partial.out;
        if (last)
          micro_rows<Epi>(mr, kl, ap, rs, step, pb, cin, partial.ld, epi, i0, n0, nc, tid);
        else
          micro_rows<StoreF32>(mr, kl, ap, rs, step, pb, cin, partial.ld, partial, i0, n0, nc, tid);
      };
      if (row_splits == 1) {
        const int64_t group = std::max<int64_t>(1, kGroupBytes / (ps * 4));
        for (int64_t g0 = p_lo; g0 < p_hi; g0 += group)
          for (int64_t t = 0; t < tiles; ++t)
            for (int64_t panel = g0; panel < std::min(g0 + group, p_hi); ++panel) tile(t, panel);
      } else {
        for (int64_t w = lo; w < hi; ++w) {
          const int64_t panel = w / row_splits, split = w % row_splits;
          const int64_t t_lo = tiles * split / row_splits, t_hi = tiles * (split + 1) / row_splits;
          for (int64_t t = t_lo; t < t_hi; ++t) tile(t, panel);
        }
      }
    }
  }
}

struct Operands {
  at::Tensor a, b, mask;
  BSource src;
  bool b_rows;  // b row-major (packed by rows) or transposed (by 8 x 8 blocks)
  int64_t as0, as1, m, k, n;
  int threads;
  Operands(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& b_mask = at::Tensor())
      : a(a_in.stride(0) == 1 || a_in.stride(1) == 1 ? a_in : a_in.contiguous()),
        b(b_in.stride(0) == 1 || b_in.stride(1) == 1 ? b_in : b_in.contiguous()),
        mask(b_mask.defined() ? b_mask.contiguous() : b_mask) {
    m = a.size(0), k = a.size(1), n = b.size(1);
    as0 = a.stride(0), as1 = a.stride(1);
    int64_t bs0 = b.stride(0), bs1 = b.stride(1);
    if (as1 != 1 && k == 1) as1 = 1;  // one column: any row stride reads in place
    if (!mask.defined()) {  // (with a mask, b stays W or W^T as the gemm op's checks read it: the mask's rows are W's)
      if (bs1 != 1 && n == 1) bs1 = 1;  // one column of b: a row-major (K, 1) with row stride bs0
      if (bs1 != 1 && k == 1) bs1 = 1, bs0 = n;
    }
    b_rows = bs1 == 1;
    src.w = b.data_ptr<float>();
    src.ld = b_rows ? bs0 : bs1;
    if (mask.defined()) src.bits = reinterpret_cast<const u32*>(mask.data_ptr<int32_t>()), src.wpr = mask.size(1);
    threads = at::in_parallel_region() || 2.0 * m * n * k < kSerialFlop ? 1 : at::get_num_threads();
  }
  // partial: out's fp32 buffer (M, N), where the K blocks before the last leave their sums
  template <typename Epi>
  void run(const Epi& epi, float* partial) const {
    harmodt::run(epi, StoreF32{partial, n, nullptr}, a.data_ptr<float>(), as0, as1, src, b_rows, m, k, n, threads);
  }
};

}  // namespace
#endif

void f32_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& b_mask) {
  TORCH_CHECK(f32_gemm_available(), "gemm: the native fp32 GEMM needs AVX2 and FMA (this build or CPU lacks them)");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "f32_gemm_out: a and b must be float32");
#if defined(HARMODT_F32_GEMM)
  if (!native_gemm_out_needs_product(out, a, b, bias, at::kFloat, "f32_gemm_out")) return;
  const int64_t n = b.size(1);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  Operands(a, b, b_mask).run(StoreF32{out.data_ptr<float>(), n, bias.defined() ? bias_.data_ptr<float>() : nullptr}, out.data_ptr<float>());
#endif
}

std::tuple<at::Tensor, at::Tensor> f32_gemm_epilogue(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind, const at::Tensor& bias,
                                                     const at::Tensor& residual, const at::Tensor& mask, int64_t seed, double p,
                                                     const at::Tensor& b_mask) {
  TORCH_CHECK(f32_gemm_available(), "gemm_epilogue: the native fp32 GEMM needs AVX2 and FMA (this build or CPU lacks them)");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kFloat));
  at::Tensor sq = epilogue_sums(kind, n, a.options());
  if (m == 0 || n == 0) return {out, sq};
#if defined(HARMODT_F32_GEMM)
  if (k == 0) {  // sums of nothing: 0 (through the same epilogue below, from a one-column zero product)
    const at::Tensor z = at::zeros({m, 1}, a.options()), zb = at::zeros({1, n}, a.options());
    return f32_gemm_epilogue(z, zb, kind, bias, residual, mask, seed, p, at::Tensor());
  }
  const Operands ops(a, b, b_mask);
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  const at::Tensor res_ = residual.defined() ? residual.contiguous() : residual;
  float* o = out.data_ptr<float>();
  switch (kind) {
    case GemmEpilogue::kBiasRelu:
      ops.run(BiasReluF32{o, n, bias_.data_ptr<float>()}, o);
      break;
    case GemmEpilogue::kBiasDropoutAdd:
      ops.run(BiasDropoutAddF32{o, res_.data_ptr<float>(), n, bias_.data_ptr<float>(), static_cast<uint64_t>(seed),
                                static_cast<uint32_t>(std::llround(p * 65536.0)), static_cast<float>(1.0 / (1.0 - p))},
              o);
      break;
    case GemmEpilogue::kReluGrad: {
      const int64_t tiles = (m + kMr - 1) / kMr;
      float* group = scratch<float>(3, static_cast<size_t>(tiles * n));  // (the caller's thread's: the workers only write it)
      ops.run(ReluGradF32{o, res_.data_ptr<float>(), n, group}, o);
      float* total = sq.data_ptr<float>();
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t j = 0; j < n; ++j) total[j] += group[t * n + j];
      break;
    }
    case GemmEpilogue::kMaskedGrad: {
      const int64_t tiles = (m + kMr - 1) / kMr, panels = (n + kNr - 1) / kNr;
      std::vector<float> block(static_cast<size_t>(tiles * panels));
      const at::Tensor words = mask.contiguous();
      ops.run(MaskedGradF32{o, n, reinterpret_cast<const u32*>(words.data_ptr<int32_t>()), words.size(1), block.data(), panels}, o);
      double total = 0.0;
      for (float v : block) total += static_cast<double>(v);
      sq.fill_(total);
      break;
    }
  }
#endif
  return {out, sq};
}

#endif  // !HARMODT_AVX512_GEMM

}  // namespace harmodt
