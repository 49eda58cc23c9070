// bf16 GEMM on AVX512-BF16 (vdpbf16ps): out (M, N) = a (M, K) b (K, N) (+ bias), bf16 operands,
// fp32 accumulation, out bf16 (rounded once, to nearest even, as oneDNN's GEMM rounds).
//
// Why our own: under CPU bf16 autocast the block GEMMs went through at::mm -> oneDNN, which ran at
// 315-321 GFLOP/s inside a training step on this project's 2-core Zen 4 machines (peak ~450 for
// vdpbf16ps on both cores) and spends ~40 us per call on fixed work (primitive lookup, reordering
// b into its VNNI layout). The model's GEMMs are few and alike (M ~600 rows, K and N 256-1024), so
// one register-blocked kernel covers them:
//
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

// A per-thread scratch buffer that only grows: no zero fill and no fresh (page-faulting) pages per call.
u32* scratch(int slot, size_t words) {
  thread_local std::vector<u32> buf[3];
  if (buf[slot].size() < words) buf[slot].resize(words);
  return buf[slot].data();
}

inline u32 load_u32(const u16* p) {
  u32 v;
  std::memcpy(&v, p, 4);
  return v;
}

// 16 bf16 of row r0 and row r1 (lanes in `m` only; r1 may be null: zeros) -> 16 pairs (r0, r1).
inline __m512i interleave16(const u16* r0, const u16* r1, __mmask16 m) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0));
  if (r1 == nullptr) return lo;
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// Panels lo .. hi of plain b (b[k][n] = b + k * ldb + n, N columns) into out + (panel - lo) * ps,
// all K. Walked pair of rows by pair of rows across the panels: each row is read once, in order
// (a walk down one panel's 32 columns would meet every row's line at the row stride).
void pack_b_rows(const u16* b, int64_t ldb, int64_t k, int64_t n, int64_t lo, int64_t hi, int64_t ps, u32* out) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t p = 0; p < kp; ++p) {
    const u16* r0 = b + 2 * p * ldb;
    const u16* r1 = 2 * p + 1 < k ? r0 + ldb : nullptr;
    for (int64_t panel = lo; panel < hi; ++panel) {
      const int64_t n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
      const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(std::max<int64_t>(nc - 16, 0));
      u32* o = out + (panel - lo) * ps + p * kNr;
      _mm512_storeu_si512(o, interleave16(r0 + n0, r1 ? r1 + n0 : nullptr, m0));
      _mm512_storeu_si512(o + 16, m1 ? interleave16(r0 + n0 + 16, r1 ? r1 + n0 + 16 : nullptr, m1) : _mm512_setzero_si512());
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
void pack_b_cols(const u16* w, int64_t ldw, int64_t k, int64_t n0, int64_t nc, u32* out) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t g = 0; g < 2; ++g) {  // two groups of 16 columns
    const int64_t c0 = g * 16, cn = std::min<int64_t>(std::max<int64_t>(nc - c0, 0), 16);
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      const int64_t elems = std::min<int64_t>(k - 2 * p0, 32);  // bf16 of each row in this block
      const __mmask32 em = elems >= 32 ? 0xFFFFFFFFu : ((1u << elems) - 1u);
      __m512i r[16];
      for (int c = 0; c < 16; ++c)
        r[c] = c < cn ? _mm512_maskz_loadu_epi16(em, w + (n0 + c0 + c) * ldw + 2 * p0) : _mm512_setzero_si512();
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
      for (int64_t i = 0; i < m; i += 16)
        _mm512_mask_storeu_epi32(o + i, tail_mask(m - i), interleave16(r0 + i, r1 ? r1 + i : nullptr, tail_mask(m - i)));
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const u16* r = a + i * s_i + 2 * p * s_k;
        o[i] = r[0] | (2 * p + 1 < k ? static_cast<u32>(r[s_k]) << 16 : 0u);
      }
    }
  }
}

// out[i0 + i][n0 .. n0 + nc) = sum_p a_pair(i, p) . bp[p] for i < MR. a_pair(i, p) = a[i * ars + p * aps].
template <int MR, typename Out>
void micro(int64_t kp, const u32* a, int64_t ars, int64_t aps, const u32* bp, const c10::BFloat16* bias, Out* out, int64_t ldo,
           int64_t nc) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + p * kNr);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + p * kNr + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * ars + p * aps]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, b1);
    }
  }
  const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(std::max<int64_t>(nc - 16, 0));
  if (bias != nullptr) {  // added in fp32 before the one rounding, as addmm does
    const __m512 b0 = load16(bias, m0), b1 = load16(bias + 16, m1);
    for (int i = 0; i < MR; ++i) acc[i][0] = _mm512_add_ps(acc[i][0], b0), acc[i][1] = _mm512_add_ps(acc[i][1], b1);
  }
  for (int i = 0; i < MR; ++i) {
    store16(out + i * ldo, acc[i][0], m0);
    if (m1) store16(out + i * ldo + 16, acc[i][1], m1);
  }
}

template <typename Out, int MR = kMr>
void micro_rows(int64_t mr, int64_t kp, const u32* a, int64_t ars, int64_t aps, const u32* bp, const c10::BFloat16* bias, Out* out,
                int64_t ldo, int64_t nc) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro<MR, Out>(kp, a, ars, aps, bp, bias, out, ldo, nc);
    return micro_rows<Out, MR - 1>(mr, kp, a, ars, aps, bp, bias, out, ldo, nc);
  }
}

// Contiguous share [lo, hi) of n items for thread `tid` of `nt`.
inline void share(int64_t n, int tid, int nt, int64_t& lo, int64_t& hi) {
  lo = n * tid / nt;
  hi = n * (tid + 1) / nt;
}

// One OpenMP region per GEMM: packing, a barrier, then the tiles. a, when it needs packing, is
// packed whole (the threads split its pairs). Then one of two loop orders; the operand read again
// and again is the smaller one, so it stays in cache:
// * b-shared: every panel of b packed once (the threads split the panels, alongside a's pairs),
//   then the threads split the row tiles; each tile meets every panel.
// * panel-outer: the threads split the column panels (and the rows, when there are fewer panels
//   than threads); each packs its own panels, then walks all tiles of a through each.
// GEMMs under kSerialFlop run on the calling thread alone (a fork and join costs more there).
constexpr double kSerialFlop = 2.0e6;

template <typename Out>
void run(Out* out, int64_t ldo, const u16* a, int64_t as0, int64_t as1, const u16* b, int64_t bs0, int64_t bs1,
         const c10::BFloat16* bias, int64_t m, int64_t k, int64_t n) {
  const int64_t kp = (k + 1) / 2;
  const int64_t panels = (n + kNr - 1) / kNr, tiles = (m + kMr - 1) / kMr;
  // a read in place: row-major with even K and an even row stride (each pair one aligned-enough word)
  const bool a_direct = as1 == 1 && k % 2 == 0 && as0 % 2 == 0 && reinterpret_cast<uintptr_t>(a) % 4 == 0;
  // packed panels lie ps words apart: past the kp * 32 words of a panel, 16 more, so that the
  // panels' starts do not all fall in one L1 set
  const int64_t ps = kp * kNr + 16;
  auto pack_panels = [&](int64_t lo, int64_t hi, u32* dst) {  // panels lo .. hi into dst, ps apart
    if (bs1 == 1) return pack_b_rows(b, bs0, k, n, lo, hi, ps, dst);
    for (int64_t panel = lo; panel < hi; ++panel)
      pack_b_cols(b, bs1, k, panel * kNr, std::min<int64_t>(kNr, n - panel * kNr), dst + (panel - lo) * ps);
  };
  // the packed rows' stride: a multiple of 16 words (whole vectors) that is not a power of two (a
  // tile's pairs at a power-of-two stride would all fall in one L1 set)
  const int64_t ld_pack = (m + 15) / 16 * 16 + 16;
  u32* apack = a_direct ? nullptr : scratch(0, kp * ld_pack);  // the caller's scratch, read by every thread
  auto tile = [&](int64_t t, int64_t panel, const u32* bp) {
    const int64_t i0 = t * kMr, mr = std::min<int64_t>(kMr, m - i0), n0 = panel * kNr, nc = std::min<int64_t>(kNr, n - n0);
    Out* o = out + i0 * ldo + n0;
    const c10::BFloat16* bb = bias == nullptr ? nullptr : bias + n0;
    if (apack == nullptr)
      micro_rows<Out>(mr, kp, reinterpret_cast<const u32*>(a + i0 * as0), as0 / 2, 1, bp, bb, o, ldo, nc);
    else
      micro_rows<Out>(mr, kp, apack + i0, 1, ld_pack, bp, bb, o, ldo, nc);
  };
  const int threads = at::in_parallel_region() || 2.0 * m * n * k < kSerialFlop ? 1 : at::get_num_threads();
  const bool b_shared = panels * kp * kNr <= tiles * kp * kMr && tiles >= threads;
  u32* bp_all = b_shared ? scratch(1, panels * ps) : nullptr;  // the caller's scratch, read by every thread
  const int64_t row_splits = panels >= threads ? 1 : std::min<int64_t>(tiles, (threads + panels - 1) / panels);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t lo, hi;
    if (apack != nullptr) {
      share(kp, tid, nt, lo, hi);
      pack_a(a, as0, as1, m, k, lo, hi, ld_pack, apack);
    }
    if (b_shared) {
      share(panels, tid, nt, lo, hi);
      pack_panels(lo, hi, bp_all + lo * ps);
    }
    if (nt > 1 && (apack != nullptr || b_shared)) {
#pragma omp barrier
    }
    if (b_shared) {
      share(tiles, tid, nt, lo, hi);
      for (int64_t t = lo; t < hi; ++t)
        for (int64_t panel = 0; panel < panels; ++panel) tile(t, panel, bp_all + panel * ps);
    } else {
      share(panels * row_splits, tid, nt, lo, hi);
      if (lo < hi) {  // this thread's panels, packed all at once into its own scratch
        const int64_t p_lo = lo / row_splits, p_hi = (hi - 1) / row_splits + 1;
        u32* bp = scratch(2, (p_hi - p_lo) * ps);
        pack_panels(p_lo, p_hi, bp);
        for (int64_t w = lo; w < hi; ++w) {
          const int64_t panel = w / row_splits, split = w % row_splits;
          const int64_t t_lo = tiles * split / row_splits, t_hi = tiles * (split + 1) / row_splits;
          for (int64_t t = t_lo; t < t_hi; ++t) tile(t, panel, bp + (panel - p_lo) * ps);
        }
      }
    }
  }
}

}  // namespace
#endif

// out (M, N) contiguous bf16; a (M, K), b (K, N) bf16, each with a unit stride in some dim (else
// copied); bias: undefined or bf16 (N,), added to every row before the rounding.
void bf16_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  TORCH_CHECK(bf16_gemm_available(), "gemm: the native bf16 GEMM needs AVX512-BF16 (this build or CPU lacks it)");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, "bf16_gemm_out: a and b must be bf16");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kBFloat16, "bf16_gemm_out: out must be contiguous bf16");
#if defined(HARMODT_BF16_GEMM)
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (bias.defined())
      out.copy_(bias.expand({m, n}));
    else
      out.zero_();
    return;
  }
  TORCH_CHECK(!bias.defined() || (bias.scalar_type() == at::kBFloat16 && bias.numel() == n), "bf16_gemm_out: bias must be bf16 (N,)");
  const at::Tensor bias_ = bias.defined() ? bias.contiguous() : bias;
  const auto* biasp = bias.defined() ? bias_.data_ptr<c10::BFloat16>() : nullptr;
  const at::Tensor a_ = a.stride(0) == 1 || a.stride(1) == 1 ? a : a.contiguous();
  const at::Tensor b_ = b.stride(0) == 1 || b.stride(1) == 1 ? b : b.contiguous();
  const auto* ap = reinterpret_cast<const u16*>(a_.data_ptr());
  const auto* bp = reinterpret_cast<const u16*>(b_.data_ptr());
  // a unit stride along rows (as1 == 1) or along K (as0 == 1); m == 1 or k == 1 views can have both
  int64_t as0 = a_.stride(0), as1 = a_.stride(1), bs0 = b_.stride(0), bs1 = b_.stride(1);
  if (as1 != 1 && m == 1) as1 = 1;  // one row: treat as row-major
  if (bs1 != 1 && k == 1) bs1 = 1, bs0 = n;
  run<c10::BFloat16>(out.data_ptr<c10::BFloat16>(), n, ap, as0, as1, bp, bs0, bs1, biasp, m, k, n);
#endif
}

}  // namespace harmodt
