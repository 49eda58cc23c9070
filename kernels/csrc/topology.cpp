// How far apart this process's two compute threads are: the round trip of one cache line between
// the first two OpenMP threads (a counter each thread bumps in turn), in ns.
//
// On a small VM the host may place the vCPUs on one CCD of an AMD EPYC (a shared L3: ~60 ns here)
// or on two (no shared L3: ~340 ns). Every line one thread writes and the other reads then costs
// that trip, so the training step's GEMMs, which share packed operands between the threads, run
// slower; the benchmarks record this next to each step time (bench/README.md, "The slow state"),
// and the bf16 GEMM asks threads_apart() whether to drop the shared lines from the caches after use
// (gemm_bf16.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>

#include <omp.h>

namespace harmodt {

double core_round_trip_ns(int64_t rounds) {
  TORCH_CHECK_VALUE(rounds >= 1, "core_round_trip_ns: rounds must be >= 1, got ", rounds);
  if (at::get_num_threads() < 2 || omp_get_max_threads() < 2) return std::numeric_limits<double>::quiet_NaN();
  // the counter on a line of its own (nothing else on the threads' stacks shares it)
  struct alignas(64) Line {
    std::atomic<int64_t> v{0};
    char pad[64 - sizeof(std::atomic<int64_t>)];
  };
  const auto line = std::make_unique<Line>();  // (aligned new: the line is this object's alone)
  std::atomic<int64_t>& turn = line->v;
  double ns = std::numeric_limits<double>::quiet_NaN();
#pragma omp parallel num_threads(2)
  {
    if (omp_get_num_threads() == 2) {
      const int tid = omp_get_thread_num();
      // a few trips first (both threads running, the line in place), then the timed ones
      const int64_t warm = 64, total = 2 * (warm + rounds);
      std::chrono::steady_clock::time_point t0;
      for (int64_t i = tid; i < total; i += 2) {
        if (i == 2 * warm && tid == 0) t0 = std::chrono::steady_clock::now();
        while (turn.load(std::memory_order_acquire) != i) {
        }
        turn.store(i + 1, std::memory_order_release);
      }
      if (tid == 0) {
        while (turn.load(std::memory_order_acquire) != total) {
        }
        ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(rounds);
      }
    }
  }
  return ns;
}

// Round trips above this mean two CCDs: ~60-130 ns measured on one, ~300-1500 on two.
constexpr double kApartNs = 200.0;

bool threads_apart(int64_t period) {
  static const int forced = [] {
    const char* e = std::getenv("HARMODT_THREADS_APART");
    return e == nullptr || e[0] == '\0' ? -1 : e[0] == '1' ? 1 : 0;
  }();
  if (forced >= 0) return forced == 1;
  static std::atomic<int64_t> calls{0};
  static std::atomic<bool> apart{false};
  if (calls.fetch_add(1, std::memory_order_relaxed) % period == 0) {  // 64 trips: ~5 us on one CCD, ~25 on two
    const double ns = core_round_trip_ns(64);
    apart.store(ns == ns && ns > kApartNs, std::memory_order_relaxed);
  }
  return apart.load(std::memory_order_relaxed);
}

}  // namespace harmodt

// (no tensor arguments: one kernel for every dispatch key)
TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) { m.def("core_round_trip_ns(int rounds) -> float", &harmodt::core_round_trip_ns); }
