// Shared helpers for the harmodt native CPU ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA without AVX-512 (AMD Zen 2/3, Intel before Skylake-X): 8-lane paths beside the
// 16-lane ones, the same arithmetic per lane.
#include <immintrin.h>
#define HARMODT_AVX2 1
#endif

namespace harmodt {

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

// Mask of the valid bits of the last word of a K-bit row (all ones when K % 32 == 0).
inline uint32_t last_word_mask(int64_t k) {
  const int64_t r = k % 32;
  return r == 0 ? 0xFFFFFFFFu : ((1u << r) - 1u);
}

inline int num_threads() { return at::get_num_threads(); }

// Contiguous share [lo, hi) of n items for thread `tid` of `nt`.
inline void share(int64_t n, int tid, int nt, int64_t& lo, int64_t& hi) {
  lo = n * tid / nt;
  hi = n * (tid + 1) / nt;
}

// A per-thread scratch buffer of T (slots 0-3 per type) that only grows: no zero fill and no
// fresh (page-faulting) pages per call (the GEMM kernels' packed operands).
template <typename T>
T* scratch(int slot, size_t n) {
  thread_local std::vector<T> buf[4];
  if (buf[slot].size() < n) buf[slot].resize(n);
  return buf[slot].data();
}

// The library's (or ATen's) op `name` through the dispatcher, so dispatch modes and profilers see the
// call (bench/ replays the GEMMs it captures that way).
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// kernels/csrc/gemm.cpp: out = a b (+ bias on every row) for 2-D a (M, K), b (K, N) of one dtype
// (contiguous or transposed views), out contiguous (M, N). fp32: the native kernel where it runs
// ("auto", "native": gemm_avx512.cpp's AVX-512 kernel, or gemm_avx2.cpp's AVX2 one on CPUs without
// AVX-512), else oneDNN's matmul ("auto", "onednn"), else at::mm / at::addmm ("blas").
// bf16 goes through gemm_avx512.cpp's AVX512-BF16 kernel ("auto" when available, "native").
enum class GemmEngine { kAuto, kNative, kOneDnn, kBlas };
// b_mask: with an fp32 b only (see gemm.cpp's gemm op).
void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
              GemmEngine engine = GemmEngine::kAuto, const at::Tensor& b_mask = at::Tensor());
bool onednn_gemm_available();
bool bf16_gemm_available();
// kernels/csrc/topology.cpp: the round trip of a cache line between the first two OpenMP threads
// in ns (NaN with fewer than two); and whether they sit on different CCDs of the host (no shared
// L3), re-probed every `period` calls (HARMODT_THREADS_APART=1/0 forces the answer).
double core_round_trip_ns(int64_t rounds);
bool threads_apart(int64_t period);
// The native fp32 GEMM (gemm_avx512.cpp with AVX-512, gemm_avx2.cpp with AVX2 + FMA only): out (M, N)
// contiguous = a (M, K) b (K, N) (+ bias), b optionally through packed mask bits b_mask over the rows
// of the matrix under b (as bf16_gemm_out).
bool f32_gemm_available();
// Whether engine "auto" runs fp32 GEMMs on that kernel: the AVX-512 one wherever it runs (on the
// model's shapes within ~5 % of oneDNN's matmul per GEMM, and it takes the masks and the epilogues
// that follow, and shares its packed operands as bench/README.md's "slow state" needs), the AVX2
// one where oneDNN's matmul does not run.
bool f32_native_by_default();
void f32_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& b_mask);
// kernels/csrc/gemm_avx512.cpp: out (M, N) contiguous = a (M, K) b (K, N) (+ bias), bf16.
// b may be fp32 (rounded to bf16 as the kernel packs it), through packed mask bits b_mask (undefined:
// none) over the rows of the matrix under b (b, or w for b = w^T).
void bf16_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& b_mask);
// A GEMM's output chain fused into it (gemm.cpp's gemm_epilogue op): relu(a b + bias) in a's dtype;
// residual + dropout(a b + bias) in fp32; (a b) * mask in fp32 with its sum of squares (float64 0-dim);
// (a b) * (z > 0) in a's dtype with its column sums (fp32 (N,)), z passed as the residual.
enum class GemmEpilogue { kBiasRelu, kBiasDropoutAdd, kMaskedGrad, kReluGrad };
// The same epilogues on the native fp32 kernel (every output fp32, z fp32 for relu_grad).
std::tuple<at::Tensor, at::Tensor> f32_gemm_epilogue(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind, const at::Tensor& bias,
                                                     const at::Tensor& residual, const at::Tensor& mask, int64_t seed, double p,
                                                     const at::Tensor& b_mask);
std::tuple<at::Tensor, at::Tensor> bf16_gemm_epilogue(const at::Tensor& a, const at::Tensor& b, GemmEpilogue kind,
                                                      const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& mask,
                                                      int64_t seed, double p, const at::Tensor& b_mask);

// Shared by the native GEMM kernels' entry points: an epilogue's sums output (float64 0-dim for
// masked_grad, fp32 (N,) for relu_grad, else undefined), zero-filled; and the product of an empty K
// (out = bias on every row, or 0).
inline at::Tensor epilogue_sums(GemmEpilogue kind, int64_t n, const at::TensorOptions& options) {
  if (kind == GemmEpilogue::kMaskedGrad) return at::zeros({}, options.dtype(at::kDouble));
  if (kind == GemmEpilogue::kReluGrad) return at::zeros({n}, options.dtype(at::kFloat));
  return at::Tensor();
}
inline void fill_empty_product(at::Tensor& out, const at::Tensor& bias) {
  if (bias.defined())
    out.copy_(bias.expand(out.sizes()));
  else
    out.zero_();
}

// The native GEMMs' out-of-place entry checks: out contiguous (M, N) of `dtype`, bias undefined or
// `dtype` (N,). Returns whether there is a product to compute: false for M = 0 or N = 0, and for
// K = 0 once out holds the bias on every row (or 0).
inline bool native_gemm_out_needs_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                                          at::ScalarType dtype, const char* name) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == dtype, name, ": out must be contiguous ", dtype);
  TORCH_CHECK(!bias.defined() || (bias.scalar_type() == dtype && bias.numel() == b.size(1)), name, ": bias must be ", dtype, " (N,)");
  if (a.size(0) == 0 || b.size(1) == 0) return false;
  if (a.size(1) == 0) {
    fill_empty_product(out, bias);
    return false;
  }
  return true;
}

// kernels/csrc/attention.cpp's forward (the op attention_forward), for fused callers.
std::tuple<at::Tensor, at::Tensor> attention_forward_op(const at::Tensor& qkv, const std::optional<at::Tensor>& k_prefix,
                                                        const std::optional<at::Tensor>& v_prefix,
                                                        const at::Tensor& key_valid, const at::Tensor& query_pos,
                                                        double p, int64_t seed, bool need_lse);

// One row of K columns through its packed mask words (bit j % 32 of word j / 32 is column j).
// With AVX-512, 16 bits of a word are the lane mask of one zero-masked load or masked add.

#if defined(HARMODT_AVX2)
// With AVX2, 8 bits are the lanes of one vector mask (lane i all ones iff bit i of bits is set).
inline __m256i bits8(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel);
}
#endif

// out[j] = bit j ? src[j] : 0 (a select: masked inf/nan give 0); out may be src.
inline void select_row_bits(const float* src, const uint32_t* words, int64_t k, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16)
    _mm512_storeu_ps(out + j, _mm512_maskz_loadu_ps(static_cast<__mmask16>(words[j >> 5] >> (j & 31)), src + j));
#elif defined(HARMODT_AVX2)
  for (; j + 8 <= k; j += 8)
    _mm256_storeu_ps(out + j, _mm256_and_ps(_mm256_castsi256_ps(bits8(words[j >> 5] >> (j & 31))), _mm256_loadu_ps(src + j)));
#endif
  for (; j < k; ++j) out[j] = ((words[j >> 5] >> (j & 31)) & 1u) ? src[j] : 0.0f;
}

// dst[j] += src[j] where bit j is set (dst untouched elsewhere).
inline void add_row_bits(const float* src, const uint32_t* words, int64_t k, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(words[j >> 5] >> (j & 31));
    const __m512 d = _mm512_loadu_ps(dst + j);
    _mm512_storeu_ps(dst + j, _mm512_mask_add_ps(d, lanes, d, _mm512_maskz_loadu_ps(lanes, src + j)));
  }
#elif defined(HARMODT_AVX2)
  for (; j + 8 <= k; j += 8) {  // d + src in the set lanes, d itself (even -0) elsewhere
    const __m256 lanes = _mm256_castsi256_ps(bits8(words[j >> 5] >> (j & 31)));
    const __m256 d = _mm256_loadu_ps(dst + j);
    _mm256_storeu_ps(dst + j, _mm256_blendv_ps(d, _mm256_add_ps(d, _mm256_and_ps(lanes, _mm256_loadu_ps(src + j))), lanes));
  }
#endif
  for (; j < k; ++j)
    if ((words[j >> 5] >> (j & 31)) & 1u) dst[j] += src[j];
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// 16 lanes of fp32 from float or bf16 memory and back (bf16 rounded to nearest even, as
// c10::BFloat16(float)); lanes outside m are not read / not written.
#define HARMODT_AVX512_CVT 1
#if defined(__AVX512VL__)
// gemm_avx512.cpp's kernels are built (fp32; bf16 too with AVX512-BF16).
#define HARMODT_AVX512_GEMM 1
#endif
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#if defined(__AVX512BF16__)
#define HARMODT_AVX512_BF16_STORE 1
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(p), m, reinterpret_cast<const __m256i&>(h));
}
#endif
#endif

// Whether load16/store16 cover element type T here (fp32 always with AVX-512; bf16 stores need
// AVX512-BF16).
template <typename T>
constexpr bool vector16_ok() {
#if defined(HARMODT_AVX512_CVT)
  if constexpr (std::is_same_v<T, float>) return true;
#if defined(HARMODT_AVX512_BF16_STORE)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return true;
#endif
#endif
  return false;
}

#if defined(HARMODT_AVX2)
// 8 lanes of fp32 from float or bf16 memory and back (bf16 rounded to nearest even, NaN to 0x7FC0,
// exactly as c10::BFloat16(float)). With a count n: only lanes i < n are read (the rest are +0) or
// written.
inline __m256i tail_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline __m256 load8(const float* p, int64_t n) { return _mm256_maskload_ps(p, tail_mask8(n)); }
inline __m256 load8(const c10::BFloat16* p, int64_t n) {
  c10::BFloat16 t[8] = {};
  if (n > 0) std::memcpy(t, p, static_cast<size_t>(n < 8 ? n : 8) * sizeof(c10::BFloat16));
  return load8(t);
}
inline void store8(float* p, __m256 v, int64_t n) { _mm256_maskstore_ps(p, tail_mask8(n), v); }
inline void store8(c10::BFloat16* p, __m256 v, int64_t n) {
  c10::BFloat16 t[8];
  store8(t, v);
  if (n > 0) std::memcpy(p, t, static_cast<size_t>(n < 8 ? n : 8) * sizeof(c10::BFloat16));
}

// _mm512_reduce_add_ps of the 16 lanes (lo, hi), in its order of adds (GCC's): the halves, the
// 128-bit halves, then lanes 0 + 2 and 1 + 3, then those two.
inline float reduce_add16(__m256 lo, __m256 hi) {
  const __m256 h8 = _mm256_add_ps(hi, lo);
  const __m128 h4 = _mm_add_ps(_mm256_extractf128_ps(h8, 1), _mm256_castps256_ps128(h8));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}
#endif

// Whether load8/store8 cover element type T here (fp32 and bf16 with AVX2, when AVX-512 is absent).
template <typename T>
constexpr bool vector8_ok() {
#if defined(HARMODT_AVX2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) return true;
#endif
  return false;
}

// Whether row16 / dropout_row take T on their vector path (16 lanes with AVX-512, 8 with AVX2).
template <typename T>
constexpr bool vector_ok() {
  return vector16_ok<T>() || vector8_ok<T>();
}

// Rows per group in the fp32 sums that a GEMM epilogue can also produce while the output tile is in
// registers (the native fp32 GEMM's tile height: 12 rows in gemm_avx512.cpp, 6 in gemm_avx2.cpp): a
// bias gradient's column sums add each group of kSumRows rows first (rows in order, from +0), then
// the groups in order; a masked gradient's sum of squares takes blocks of kSumRows rows x 16
// columns. Both orders are the same for any thread count.
#if defined(HARMODT_AVX512_GEMM)
constexpr int64_t kSumRows = 12;
#else
constexpr int64_t kSumRows = 6;
#endif

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// The j-th output of the SplitMix64 generator started at seed (shared by dropout and attention).
inline uint64_t splitmix(uint64_t seed, uint64_t j) {
  uint64_t z = seed + (j + 1) * kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// Blocks b .. b+7 at once: the 8 draws, seen as 32 little-endian 16-bit fields, are exactly the
// draws of elements 4b .. 4b+31 in order.
inline __m512i splitmix8(uint64_t seed, int64_t b) {
  const __m512i j = _mm512_add_epi64(_mm512_set1_epi64(b + 1), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  __m512i z = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(seed)),
                               _mm512_mullo_epi64(j, _mm512_set1_epi64(static_cast<int64_t>(kGolden))));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64(static_cast<int64_t>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64(static_cast<int64_t>(0x94D049BB133111EBull)));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}
#endif

// ---- the dropout keep mask (dropout.cpp's definition), walked 16 lanes at a time ------------

#if defined(HARMODT_AVX512_CVT)
// Keep bits of the 16 elements at flat indices i .. i+15 (any alignment): the 8 draws from block
// i / 4 cover elements 4 * (i / 4) .. +31.
inline __mmask16 keep16(uint64_t seed, int64_t i, __m512i thr) {
  const int64_t a = i >> 2;
  const uint32_t bits = _mm512_cmpge_epu16_mask(splitmix8(seed, a), thr);
  return static_cast<__mmask16>(bits >> (i - 4 * a));
}
#endif

#if defined(HARMODT_AVX2)
// 8 x 8 transpose of fp32 lanes, in place.
inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 s[8];
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Low 64 bits of a * c in each 64-bit lane (AVX2 has no 64-bit multiply: three 32 x 32 -> 64 products).
inline __m256i mullo64(__m256i a, uint64_t c) {
  const __m256i cl = _mm256_set1_epi64x(static_cast<int64_t>(c & 0xFFFFFFFFull)), ch = _mm256_set1_epi64x(static_cast<int64_t>(c >> 32));
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), cl), _mm256_mul_epu32(a, ch));
  return _mm256_add_epi64(_mm256_mul_epu32(a, cl), _mm256_slli_epi64(cross, 32));
}

// Blocks b .. b+3 at once (splitmix on 4 lanes): the 4 draws, seen as 16 little-endian 16-bit
// fields, are exactly the draws of elements 4b .. 4b+15 in order.
inline __m256i splitmix4(uint64_t seed, int64_t b) {
  const uint64_t z0 = seed + (static_cast<uint64_t>(b) + 1) * kGolden;
  __m256i z = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(z0)),
                               _mm256_setr_epi64x(0, static_cast<int64_t>(kGolden), static_cast<int64_t>(2 * kGolden),
                                                  static_cast<int64_t>(3 * kGolden)));
  z = mullo64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), 0xBF58476D1CE4E5B9ull);
  z = mullo64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), 0x94D049BB133111EBull);
  return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

// Keep bits of elements 4b .. 4b+15 (bit t: element 4b + t kept; thr: the threshold in every
// 16-bit field).
inline uint32_t keep_bits16(uint64_t seed, int64_t b, __m256i thr) {
  const __m256i h = splitmix4(seed, b);
  const __m256i ge = _mm256_cmpeq_epi16(_mm256_max_epu16(h, thr), h);  // field >= threshold
  const uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(ge, ge)));  // per 128-bit half: 8 bits twice
  return (m & 0xFFu) | ((m >> 8) & 0xFF00u);
}

// Keep bits of the 16 elements at flat indices i .. i+15 (any alignment): bits i % 4 .. of the
// stream from element 4 * (i / 4), one 4-lane hash when i is a multiple of 4, else two.
inline uint32_t keep_bits16_at(uint64_t seed, int64_t i, __m256i thr) {
  const int64_t a = i >> 2;
  const int s = static_cast<int>(i & 3);
  const uint32_t lo = keep_bits16(seed, a, thr);
  if (s == 0) return lo;
  return ((lo | (keep_bits16(seed, a + 4, thr) << 16)) >> s) & 0xFFFFu;
}

// Keep lanes of the 8 elements at flat indices i .. i+7 (any alignment; threshold <= 0xFFFF in
// thr's 16-bit fields): elements i .. i+7 lie within the 16 of blocks i / 4 .. i / 4 + 3.
inline __m256i keep8(uint64_t seed, int64_t i, __m256i thr) {
  return bits8(keep_bits16(seed, i >> 2, thr) >> static_cast<int>(i & 3));
}
#endif

inline bool keep_scalar(uint64_t seed, int64_t i, uint32_t threshold) {
  const uint64_t h = splitmix(seed, static_cast<uint64_t>(i >> 2));
  return static_cast<uint32_t>((h >> (16 * (i & 3))) & 0xFFFFu) >= threshold;
}

// One row of n columns: with Vec, vec(j, lanes) per 16-lane chunk (lanes: the live ones); the
// remaining columns (all of them without AVX-512) go through scal(j) one at a time.
// With AVX2 instead: vec(j, lanes) per whole 8-lane chunk (lanes all ones), the tail through scal.
template <bool Vec, typename VecFn, typename ScalarFn>
inline void row16(int64_t n, VecFn&& vec, ScalarFn&& scal) {
  int64_t j = 0;
#if defined(HARMODT_AVX512_CVT)
  if constexpr (Vec)
    for (; j < n; j += 16) vec(j, tail_mask(n - j));
#elif defined(HARMODT_AVX2)
  if constexpr (Vec)
    for (; j + 8 <= n; j += 8) vec(j, _mm256_set1_epi32(-1));
#endif
  for (; j < n; ++j) scal(j);
}

// One row of n elements at flat offset base through the dropout keep mask (dropout.cpp): vec(j,
// lanes, keep) per 16-lane chunk (keep: the kept ones among the live lanes), scal(j, kept) for the
// rest. Thresholds above 0xFFFF (p rounds to 1) take the scalar path. With AVX2: 8-lane chunks.
template <bool Vec, typename VecFn, typename ScalarFn>
inline void dropout_row(uint64_t seed, uint32_t threshold, int64_t base, int64_t n, VecFn&& vec, ScalarFn&& scal) {
  auto scalar = [&](int64_t j) { scal(j, keep_scalar(seed, base + j, threshold)); };
#if defined(HARMODT_AVX512_CVT)
  if constexpr (Vec) {
    if (threshold <= 0xFFFF) {
      const __m512i thr = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
      int64_t j = 0;
      if ((base & 3) == 0)  // block-aligned: one 8-draw hash serves 32 elements
        for (; j + 32 <= n; j += 32) {
          const uint32_t bits = threshold == 0 ? 0xFFFFFFFFu : _mm512_cmpge_epu16_mask(splitmix8(seed, (base + j) >> 2), thr);
          vec(j, static_cast<__mmask16>(0xFFFF), static_cast<__mmask16>(bits));
          vec(j + 16, static_cast<__mmask16>(0xFFFF), static_cast<__mmask16>(bits >> 16));
        }
      row16<true>(
          n - j,
          [&](int64_t k, __mmask16 lanes) {
            vec(j + k, lanes, threshold == 0 ? lanes : static_cast<__mmask16>(keep16(seed, base + j + k, thr) & lanes));
          },
          [&](int64_t k) { scalar(j + k); });
      return;
    }
  }
#elif defined(HARMODT_AVX2)
  if constexpr (Vec) {
    if (threshold <= 0xFFFF) {  // whole 8-lane chunks (keep: an all-ones lane per kept element), the tail scalar
      const __m256i thr = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold)));
      const __m256i all = _mm256_set1_epi32(-1);
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) {  // 16 keep bits per one or two 4-lane hashes
        const uint32_t k = threshold == 0 ? 0xFFFFu : keep_bits16_at(seed, base + j, thr);
        vec(j, all, bits8(k));
        vec(j + 8, all, bits8(k >> 8));
      }
      for (; j + 8 <= n; j += 8) vec(j, all, threshold == 0 ? all : keep8(seed, base + j, thr));
      for (; j < n; ++j) scalar(j);
      return;
    }
  }
#endif
  row16<false>(n, [](int64_t, auto) {}, scalar);
}

}  // namespace harmodt
