// y[M, N] = x[M, E] . w[N, E]^T in float32 for few rows M: the matrix products of a decode
// step (M = batch rows x new tokens: AR steps, drafting, verification). XLA's CPU dot runs
// these below the rate that streaming the weights allows; this kernel reads each weight row
// from memory once for all M rows and keeps every output's partial sums in vector registers:
// up to six rows one weight row at a time (a single prefetched stream), seven or eight rows
// in blocks of R weight rows, more rows in passes of eight over a cache-sized tile of weight
// rows. The weight rows are split over XLA's intra-op thread pool.
//
// Built on first use by ppow_jax/cpu_gemv.py (g++ -O3 -march=native) and called through the
// XLA FFI. Portable C++17 with GCC/Clang vector extensions (AVX-512, AVX2 or NEON).
#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using ppow::HorizontalSum;
using ppow::kLanes;
using ppow::Vec;

// Weight rows [r, r + R) against M rows of x: R * M accumulators in vector registers.
template <int M, int R>
inline void Block(const float* x, const float* w, float* y, int64_t e, int64_t n, int64_t r) {
  const int64_t e_vec = e / kLanes * kLanes;
  Vec acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = Vec{};
  for (int64_t k = 0; k < e_vec; k += kLanes) {
    Vec xv[M];
    for (int m = 0; m < M; ++m) xv[m] = *reinterpret_cast<const Vec*>(x + m * e + k);
    for (int i = 0; i < R; ++i) {
      // the next block's rows, one block ahead: deep enough to keep DRAM busy
      __builtin_prefetch(w + (r + R + i) * e + k, 0, 3);
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

// Up to six rows of x (AR steps, drafting, a batch-1 verification): one weight row at a time,
// read front to back into U * M accumulators while the next row is prefetched. One sequential
// stream is what the memory system serves fastest: 8-15% faster than R interleaved rows here,
// which win from seven rows on, where the arithmetic per weight byte grows.
template <int M>
void Stream(const float* x, const float* w, float* y, int64_t e, int64_t n, int64_t r0,
            int64_t r1) {
  constexpr int U = 4 / M > 1 ? 4 / M : 1;  // vectors of a row in flight per step
  const int64_t e_step = e / (U * kLanes) * (U * kLanes), e_vec = e / kLanes * kLanes;
  const auto at = ppow::Load;
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * e;
    Vec acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = Vec{};
    int64_t k = 0;
    for (; k < e_step; k += U * kLanes) {
      for (int c = 0; c < U * kLanes; c += 64 / sizeof(float))  // each cache line, a row ahead
        __builtin_prefetch(wr + e + k + c, 0, 3);
      for (int u = 0; u < U; ++u) {
        const Vec wv = at(wr + k + u * kLanes);
        for (int m = 0; m < M; ++m) acc[u][m] += wv * at(x + m * e + k + u * kLanes);
      }
    }
    for (int m = 0; m < M; ++m) {
      Vec sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum += acc[u][m];
      int64_t kk = k;
      for (; kk < e_vec; kk += kLanes) sum += at(wr + kk) * at(x + m * e + kk);
      float s = HorizontalSum(sum);
      for (; kk < e; ++kk) s += wr[kk] * x[m * e + kk];
      y[m * n + r] = s;
    }
  }
}

// Rows [r0, r1) of w against M rows of x: one weight row at a time up to six rows, else R
// rows at a time, then one at a time.
template <int M>
void RowRange(const float* x, const float* w, float* y, int64_t e, int64_t n, int64_t r0,
              int64_t r1) {
  if constexpr (M <= 6) {
    Stream<M>(x, w, y, e, n, r0, r1);
  } else {
    constexpr int R = 24 / M;  // R * M + M + 1 <= 32 vector registers (3 for 7 or 8 rows)
    int64_t r = r0;
    for (; r + R <= r1; r += R) Block<M, R>(x, w, y, e, n, r);
    for (; r < r1; ++r) Block<M, 1>(x, w, y, e, n, r);
  }
}

struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t m, e, n;
};

// Output columns [r0, r1) for every row of x, eight rows of x per pass over a tile of weight
// rows small enough to stay in the core's cache (~128 KB) while all the passes read it: the
// weights come from memory once however many rows x has.
void Columns(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t tile = p.m <= 8 ? r1 - r0 : std::max<int64_t>(12, (32768 / p.e) / 12 * 12);
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = std::min(r1, t0 + tile);
    for (int64_t m0 = 0; m0 < p.m; m0 += 8) {
      const float* x = p.x + m0 * p.e;
      float* y = p.y + m0 * p.n;
      switch (std::min<int64_t>(8, p.m - m0)) {
        case 1: RowRange<1>(x, p.w, y, p.e, p.n, t0, t1); break;
        case 2: RowRange<2>(x, p.w, y, p.e, p.n, t0, t1); break;
        case 3: RowRange<3>(x, p.w, y, p.e, p.n, t0, t1); break;
        case 4: RowRange<4>(x, p.w, y, p.e, p.n, t0, t1); break;
        case 5: RowRange<5>(x, p.w, y, p.e, p.n, t0, t1); break;
        case 6: RowRange<6>(x, p.w, y, p.e, p.n, t0, t1); break;
        case 7: RowRange<7>(x, p.w, y, p.e, p.n, t0, t1); break;
        default: RowRange<8>(x, p.w, y, p.e, p.n, t0, t1); break;
      }
    }
  }
}

void Run(const Problem& p, ffi::ThreadPool& pool) {
  const int64_t min_rows = 64;  // below this a hand-off costs more than it saves
  const int64_t parts =
      std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), p.n / min_rows);
  if (parts <= 1) {
    Columns(p, 0, p.n);
    return;
  }
  // equal parts, each a multiple of 4 rows (the kernel's widest row block)
  const int64_t per = ((p.n + parts - 1) / parts + 3) / 4 * 4;
  ppow::ParallelFor(pool, (p.n + per - 1) / per, [&p, per](int64_t i) {
    Columns(p, i * per, std::min(p.n, (i + 1) * per));
  });
}

ffi::Error MatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_gemv: want x[M, E] and w[N, E]");
  Run(Problem{x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]}, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PpowCpuMatmulTF32, MatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
