// y[M, N] = x[M, E] . w[N, E]^T in float32 for few rows M: the matrix products of a decode
// step (M = batch rows x new tokens). XLA's CPU dot streams such matrix-vector products well
// below the memory bandwidth; this kernel reads each weight row once (prefetching the next
// block of rows), keeps every output's partial sums in vector registers and splits the
// weight rows over a small pool of threads that spin briefly between calls (a decode step
// issues ~120 of them back to back).
//
// Built on first use by ppow_jax/cpu_gemv.py (g++ -O3 -march=native) and called through the
// XLA FFI. Portable C++17 with GCC/Clang vector extensions (AVX-512, AVX2 or NEON).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));

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

// Rows [r0, r1) of w against M rows of x; R weight rows at a time, R * M accumulators.
template <int M>
void RowRange(const float* x, const float* w, float* y, int64_t e, int64_t n, int64_t r0,
              int64_t r1) {
  constexpr int R = 24 / M > 4 ? 4 : 24 / M;  // R * M + M + 1 <= 32 vector registers
  const int64_t e_vec = e / kLanes * kLanes;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    Vec acc[R][M];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < M; ++m) acc[i][m] = Vec{};
    for (int64_t k = 0; k < e_vec; k += kLanes) {
      Vec xv[M];
      for (int m = 0; m < M; ++m) xv[m] = *reinterpret_cast<const Vec*>(x + m * e + k);
      for (int i = 0; i < R; ++i) {
        // the next block's rows, one block ahead: deep enough to keep DRAM busy
        __builtin_prefetch(w + (r + R + i) * e + k, 0, 0);
        const Vec wv = *reinterpret_cast<const Vec*>(w + (r + i) * e + k);
        for (int m = 0; m < M; ++m) acc[i][m] += wv * xv[m];
      }
    }
    for (int i = 0; i < R; ++i) {
      for (int m = 0; m < M; ++m) {
        float s = HorizontalSum(acc[i][m]);
        for (int64_t k = e_vec; k < e; ++k) s += w[(r + i) * e + k] * x[m * e + k];
        y[m * n + r + i] = s;
      }
    }
  }
  for (; r < r1; ++r) {
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < e; ++k) s += w[r * e + k] * x[m * e + k];
      y[m * n + r] = s;
    }
  }
}

struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t m, e, n;
};

// Output columns [r0, r1) for every row of x, eight rows of x per pass over the weights.
void Columns(const Problem& p, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < p.m; m0 += 8) {
    const float* x = p.x + m0 * p.e;
    float* y = p.y + m0 * p.n;
    switch (std::min<int64_t>(8, p.m - m0)) {
      case 1: RowRange<1>(x, p.w, y, p.e, p.n, r0, r1); break;
      case 2: RowRange<2>(x, p.w, y, p.e, p.n, r0, r1); break;
      case 3: RowRange<3>(x, p.w, y, p.e, p.n, r0, r1); break;
      case 4: RowRange<4>(x, p.w, y, p.e, p.n, r0, r1); break;
      case 5: RowRange<5>(x, p.w, y, p.e, p.n, r0, r1); break;
      case 6: RowRange<6>(x, p.w, y, p.e, p.n, r0, r1); break;
      case 7: RowRange<7>(x, p.w, y, p.e, p.n, r0, r1); break;
      default: RowRange<8>(x, p.w, y, p.e, p.n, r0, r1); break;
    }
  }
}

// One helper thread per extra core. Each owns its job slot: the caller writes the slot only
// while the helper is idle, then bumps `posted`; the helper runs it and stores `done`.
// Helpers spin for a millisecond after a job (the next matrix product of the step follows
// within microseconds), then sleep on a condition variable.
class Helper {
 public:
  Helper() : thread_([this] { Loop(); }) { thread_.detach(); }

  void Post(const Problem* problem, int64_t r0, int64_t r1) {
    problem_ = problem;
    r0_ = r0;
    r1_ = r1;
    const uint64_t job = posted_.load(std::memory_order_relaxed) + 1;
    posted_.store(job, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_one();
    }
  }

  void Wait() const {
    const uint64_t job = posted_.load(std::memory_order_relaxed);
    while (done_.load(std::memory_order_acquire) != job) CpuRelax();
  }

 private:
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
      uint64_t job;
      for (int i = 0; (job = posted_.load(std::memory_order_acquire)) == seen; ++i) {
        CpuRelax();
        if ((i & 1023) == 1023 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleeping_.store(true, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return posted_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.store(false, std::memory_order_relaxed);
        }
      }
      seen = job;
      Columns(*problem_, r0_, r1_);
      done_.store(job, std::memory_order_release);
    }
  }

  const Problem* problem_ = nullptr;
  int64_t r0_ = 0, r1_ = 0;
  std::atomic<uint64_t> posted_{0}, done_{0};
  std::atomic<bool> sleeping_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread thread_;
};

// Cores this process may run on (its affinity mask: taskset, cgroup cpusets), else all.
unsigned UsableCores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
  return std::thread::hardware_concurrency();
}

class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool();  // never destroyed: helpers are detached
    return *pool;
  }

  void Run(const Problem& p) {
    const int64_t min_rows = 64;  // below this a helper's hand-off costs more than it saves
    int64_t parts = std::min<int64_t>(1 + helpers_.size(), p.n / min_rows);
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (parts <= 1 || !busy.owns_lock()) {  // small, or another call holds the helpers
      Columns(p, 0, p.n);
      return;
    }
    // equal parts, each a multiple of 4 rows (the kernel's widest row block)
    const int64_t per = ((p.n + parts - 1) / parts + 3) / 4 * 4;
    parts = (p.n + per - 1) / per;
    for (int64_t i = 1; i < parts; ++i)
      helpers_[i - 1]->Post(&p, i * per, std::min(p.n, (i + 1) * per));
    Columns(p, 0, std::min(p.n, per));
    for (int64_t i = 1; i < parts; ++i) helpers_[i - 1]->Wait();
  }

 private:
  Pool() {
    const unsigned cores = std::max(1u, std::min(8u, UsableCores()));
    for (unsigned i = 1; i < cores; ++i) helpers_.emplace_back(new Helper());
  }

  std::vector<std::unique_ptr<Helper>> helpers_;
  std::mutex busy_;
};

ffi::Error MatmulT(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_gemv: want x[M, E] and w[N, E]");
  Pool::Get().Run(Problem{x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PpowCpuMatmulTF32, MatmulT,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
