// harmony_select: Algorithm 2's per-task mask/recover selection for all tasks in one call, given
// the scores (harmony H_i of Eq. 8 and recovery g_i * ghat of Eq. 10, computed by the caller);
// equal bit-for-bit to kernels.reference.harmony_select (ties -> lowest index; -0.0 == +0.0; NaN
// sorts after +inf ascending and first descending, like torch.sort).
//
// In parallel over tasks (at::parallel_for, one scratch per chunk of tasks, nothing [T, P]):
//   pass 1 streams over P mapping the harmony of active weights and the recovery score of masked
//          ones to order-preserving 32-bit keys, into two 65536-bucket histograms of the top 16
//          key bits;
//   the bucket holding the k_i-th smallest key is found from the histogram;
//   pass 2 collects only the keys of those buckets as (key << 32 | index) and nth_element gives
//          the exact k_i-th (key, index) thresholds;
//   pass 3 writes the new mask words: dropped iff (H key, j) <= threshold, recovered iff
//          (recovery key, j) <= threshold (recovery wins, as the reference assigns it last).
// Keys are recomputed in each pass instead of stored: three streaming reads, O(#bucket) scratch.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace harmodt {
namespace {

// Order-preserving key: ascending float order, -0.0 == +0.0, every NaN above +inf (branch-free,
// so the block loops below vectorize).
inline uint32_t key_asc(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  uint32_t k = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  k = (f == 0.0f) ? 0x80000000u : k;
  return (f != f) ? 0xFFFFFFFFu : k;
}

constexpr int kBucketBits = 16;
constexpr int kShift = 32 - kBucketBits;
constexpr int64_t kBuckets = int64_t(1) << kBucketBits;

struct TaskView {
  const float* harmony;   // [P]
  const float* recovery;  // [P]
  const uint32_t* mw;     // [W]
  int64_t p;
};

// Keys of one 32-column word: hk = ascending key of H (+inf on masked columns), rk = ascending key
// of the *descending* recovery order, ~key(recovery) (~key(-inf) on active columns).
inline void word_keys(const TaskView& v, int64_t w, int64_t lim, uint32_t* hk, uint32_t* rk) {
  const uint32_t h_masked = key_asc(std::numeric_limits<float>::infinity());
  const uint32_t r_active = ~key_asc(-std::numeric_limits<float>::infinity());
  const uint32_t bits = v.mw[w];
  const int64_t base = w * 32;
  const float* h = v.harmony + base;
  const float* r = v.recovery + base;
  for (int64_t b = 0; b < lim; ++b) {
    const bool active = (bits >> b) & 1u;
    hk[b] = active ? key_asc(h[b]) : h_masked;
    rk[b] = active ? r_active : ~key_asc(r[b]);
  }
}

// Calls fn(base, lim, bits, hk, rk) for every mask word.
template <class Fn>
inline void for_each_word(const TaskView& v, Fn fn) {
  alignas(64) uint32_t hk[32];
  alignas(64) uint32_t rk[32];
  const int64_t nw = num_words(v.p);
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t lim = std::min<int64_t>(32, v.p - w * 32);
    word_keys(v, w, lim, hk, rk);
    fn(w * 32, lim, v.mw[w], hk, rk);
  }
}

// Bucket b holding the kk-th smallest key (1-based kk) and how many keys lie in lower buckets.
inline void find_bucket(const std::vector<uint32_t>& hist, int64_t kk, uint32_t& bucket, int64_t& below) {
  int64_t cum = 0;
  for (int64_t b = 0; b < kBuckets; ++b) {
    if (cum + hist[b] >= kk) {
      bucket = static_cast<uint32_t>(b);
      below = cum;
      return;
    }
    cum += hist[b];
  }
  TORCH_CHECK(false, "harmony_select: internal error, histogram holds fewer than k keys");
}

inline uint64_t pair_key(uint32_t key, int64_t j) { return (uint64_t(key) << 32) | uint64_t(j); }

at::Tensor harmony_select(const at::Tensor& harmony_in, const at::Tensor& recovery_in, const at::Tensor& masks_in,
                          int64_t k) {
  TORCH_CHECK_VALUE(harmony_in.device().is_cpu() && recovery_in.device().is_cpu() && masks_in.device().is_cpu(),
                    "harmony_select: all tensors must be on the CPU");
  TORCH_CHECK_VALUE(harmony_in.dim() == 2, "harmony_select: harmony must be [T, P], got ", harmony_in.sizes());
  const int64_t t_count = harmony_in.size(0), p = harmony_in.size(1);
  TORCH_CHECK_VALUE(recovery_in.dim() == 2 && recovery_in.size(0) == t_count && recovery_in.size(1) == p,
                    "harmony_select: recovery must be [", t_count, ", ", p, "], got ", recovery_in.sizes());
  TORCH_CHECK_VALUE(harmony_in.scalar_type() == at::kFloat && recovery_in.scalar_type() == at::kFloat,
                    "harmony_select: harmony and recovery must be float32, got ", harmony_in.scalar_type(), " and ",
                    recovery_in.scalar_type());
  TORCH_CHECK_VALUE(masks_in.scalar_type() == at::kInt, "harmony_select: masks must be packed int32, got ",
                    masks_in.scalar_type());
  const int64_t nw = num_words(p);
  TORCH_CHECK_VALUE(masks_in.dim() == 2 && masks_in.size(0) == t_count && masks_in.size(1) == nw,
                    "harmony_select: masks must be [", t_count, ", ", nw, "], got ", masks_in.sizes());
  TORCH_CHECK_VALUE(p < (int64_t(1) << 32), "harmony_select: P must be < 2^32, got ", p);
  const at::Tensor masks = masks_in.contiguous();
  at::Tensor out = at::empty({t_count, nw}, masks.options());
  if (t_count == 0 || p == 0) return out;

  const at::Tensor harmony = harmony_in.contiguous();
  const at::Tensor recovery = recovery_in.contiguous();
  const float* h_p = harmony.data_ptr<float>();
  const float* r_p = recovery.data_ptr<float>();
  const uint32_t* m_p = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  uint32_t* o_p = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const uint32_t tail = last_word_mask(p);

  at::parallel_for(0, t_count, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> hist_h, hist_r;
    std::vector<uint64_t> cand_h, cand_r;
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t* mw = m_p + i * nw;
      uint32_t* ow = o_p + i * nw;
      int64_t n_active = 0;
      for (int64_t w = 0; w < nw; ++w) {
        const uint32_t bits = w == nw - 1 ? (mw[w] & tail) : mw[w];
        n_active += __builtin_popcount(bits);
      }
      const int64_t kk = std::min<int64_t>(k, std::min<int64_t>(n_active, p - n_active));
      if (kk <= 0) {
        for (int64_t w = 0; w < nw; ++w) ow[w] = w == nw - 1 ? (mw[w] & tail) : mw[w];
        continue;
      }
      const TaskView v{h_p + i * p, r_p + i * p, mw, p};
      // Pass 1: histograms of the top key bits (constant keys added in bulk).
      hist_h.assign(kBuckets, 0);
      hist_r.assign(kBuckets, 0);
      for_each_word(v, [&](int64_t, int64_t lim, uint32_t bits, const uint32_t* hk, const uint32_t* rk) {
        for (int64_t b = 0; b < lim; ++b) {
          if ((bits >> b) & 1u)
            ++hist_h[hk[b] >> kShift];
          else
            ++hist_r[rk[b] >> kShift];
        }
      });
      hist_h[key_asc(std::numeric_limits<float>::infinity()) >> kShift] += static_cast<uint32_t>(p - n_active);
      hist_r[(~key_asc(-std::numeric_limits<float>::infinity())) >> kShift] += static_cast<uint32_t>(n_active);
      uint32_t bh = 0, br = 0;
      int64_t below_h = 0, below_r = 0;
      find_bucket(hist_h, kk, bh, below_h);
      find_bucket(hist_r, kk, br, below_r);
      // Pass 2: candidates as (key << 32 | index). "Direct" sides (the usual case: k is small, so
      // few keys lie at or below the threshold bucket) collect every key up to the bucket and are
      // applied by index; otherwise only the bucket's keys give an exact threshold for pass 3.
      const int64_t cap = std::max<int64_t>(1024, p / 8);
      const bool direct_h = below_h + int64_t(hist_h[bh]) <= cap;
      const bool direct_r = below_r + int64_t(hist_r[br]) <= cap;
      const uint32_t lo_h = direct_h ? 0u : bh, lo_r = direct_r ? 0u : br;
      cand_h.clear();
      cand_r.clear();
      cand_h.reserve((direct_h ? below_h : 0) + hist_h[bh]);
      cand_r.reserve((direct_r ? below_r : 0) + hist_r[br]);
      for_each_word(v, [&](int64_t base, int64_t lim, uint32_t, const uint32_t* hk, const uint32_t* rk) {
        for (int64_t b = 0; b < lim; ++b) {
          const uint32_t h = hk[b] >> kShift, r = rk[b] >> kShift;
          if (h <= bh && h >= lo_h) cand_h.push_back(pair_key(hk[b], base + b));
          if (r <= br && r >= lo_r) cand_r.push_back(pair_key(rk[b], base + b));
        }
      });
      const int64_t need_h = direct_h ? kk : kk - below_h, need_r = direct_r ? kk : kk - below_r;
      std::nth_element(cand_h.begin(), cand_h.begin() + (need_h - 1), cand_h.end());
      std::nth_element(cand_r.begin(), cand_r.begin() + (need_r - 1), cand_r.end());
      // Apply, in the reference's order: every drop first, then every recovery (recovery wins).
      for (int64_t w = 0; w < nw; ++w) ow[w] = mw[w];
      if (direct_h) {
        for (int64_t q = 0; q < kk; ++q) {
          const uint32_t j = static_cast<uint32_t>(cand_h[q]);
          ow[j >> 5] &= ~(1u << (j & 31));
        }
      }
      if (!direct_h || !direct_r) {
        // Pass 3: (key, j) <= the k_i-th smallest (key, index) pair of a non-direct side.
        const uint64_t th = direct_h ? 0 : cand_h[need_h - 1];
        const uint64_t tr = direct_r ? 0 : cand_r[need_r - 1];
        for_each_word(v, [&](int64_t base, int64_t lim, uint32_t, const uint32_t* hk, const uint32_t* rk) {
          uint32_t& word = ow[base >> 5];
          for (int64_t b = 0; b < lim; ++b) {
            const int64_t j = base + b;
            if (!direct_h && pair_key(hk[b], j) <= th) word &= ~(1u << b);
          }
          for (int64_t b = 0; b < lim; ++b) {
            const int64_t j = base + b;
            if (!direct_r && pair_key(rk[b], j) <= tr) word |= 1u << b;
          }
        });
      }
      if (direct_r) {
        for (int64_t q = 0; q < kk; ++q) {
          const uint32_t j = static_cast<uint32_t>(cand_r[q]);
          ow[j >> 5] |= 1u << (j & 31);
        }
      }
      ow[nw - 1] &= tail;
    }
  });
  return out;
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("harmony_select", &harmodt::harmony_select); }
