// What the CPU kernels (cpu_gemv.cc, cpu_attention.cc) share: a 16-float vector type, its
// horizontal sum, and a parallel loop over XLA's intra-op thread pool. Built with them into
// one library by ppow_jax/cpu_gemv.py.
#ifndef PPOW_JAX_CPU_KERNELS_H_
#define PPOW_JAX_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ppow {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// Halving adds (a few shuffles and adds, against 15 dependent scalar adds lane by lane).
inline float HorizontalSum(Vec v) {
  Half h[2];
  std::memcpy(h, &v, sizeof(v));
  const Half s8 = h[0] + h[1];
  Quarter q[2];
  std::memcpy(q, &s8, sizeof(s8));
  const Quarter s4 = q[0] + q[1];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Runs part(i) for i in [0, parts). The caller and the tasks it schedules on XLA's intra-op
// thread pool claim parts from a shared counter until none is left, so the caller never waits
// on a task that has not started (a busy pool only makes the caller do more parts); a task
// that starts late finds nothing to do. Shared ownership keeps the job alive for it.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts,
                        std::function<void(int64_t)> part) {
  if (parts <= 1) {
    if (parts == 1) part(0);
    return;
  }
  struct Job {
    std::function<void(int64_t)> part;
    int64_t parts;
    std::atomic<int64_t> next{0}, done{0};
    void Run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
        part(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto job = std::make_shared<Job>();
  job->part = std::move(part);
  job->parts = parts;
  const int64_t helpers = std::min<int64_t>(parts, pool.num_threads()) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Run(); });
  job->Run();
  while (job->done.load(std::memory_order_acquire) < job->parts) CpuRelax();
}

}  // namespace ppow

#endif  // PPOW_JAX_CPU_KERNELS_H_
