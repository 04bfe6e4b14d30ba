// Attention of a few query rows against a KV cache in float32, in one call: for every head n
// and query row m, out[n, m] = softmax(scale * q[n, m] . k[n, s] over the slots s that
// mask[b, t, s] allows) . v[n, s], with b = n / (N / B) (heads are row-major within a batch
// row) and t = m % T (query rows are (group, token) pairs, token fastest).
//
// A decode step's attention has few query rows (T new tokens times the query heads sharing a
// KV head), and XLA's CPU backend spends far more on the score product with the cache and the
// softmax's small fusions than on reading the cache. Here each key and value row is read once
// for all query rows of its head, and slots that no query row sees are never read. A query
// row that sees no slot at all gets the mean of every value row, as a softmax over scores that
// are all the lowest float does.
//
// Built into ppow_jax/cpu_gemv.py's library and called through the XLA FFI.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using ppow::kLanes;
using ppow::Load;
using ppow::Vec;

struct Shapes {
  const float *q, *k, *v;
  const bool* mask;
  float* out;
  int64_t n, m, s, d, b, t;
  float scale;
};

inline float Dot(const float* a, const float* b, int64_t d) {
  const int64_t d_vec = d / kLanes * kLanes;
  Vec acc{};
  for (int64_t i = 0; i < d_vec; i += kLanes) acc += Load(a + i) * Load(b + i);
  float sum = ppow::HorizontalSum(acc);
  for (int64_t i = d_vec; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// out_row (d floats) += p * v_row
inline void Axpy(float p, const float* v_row, float* out_row, int64_t d) {
  const int64_t d_vec = d / kLanes * kLanes;
  for (int64_t i = 0; i < d_vec; i += kLanes) {
    Vec o = Load(out_row + i) + p * Load(v_row + i);
    std::memcpy(out_row + i, &o, sizeof(o));
  }
  for (int64_t i = d_vec; i < d; ++i) out_row[i] += p * v_row[i];
}

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(4)));

inline Vec Splat(float c) { return Vec{} + c; }

// e^x lane by lane: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by a degree-6 polynomial (the
// Cephes single-precision coefficients), 2^n put into the exponent bits. Inputs are clamped to
// [-87.3, 88.4], where 2^n stays a normal float; the callers' arguments are <= 0.
inline Vec Exp(Vec x) {
  x = x > Splat(88.37626f) ? Splat(88.37626f) : x;
  x = x < Splat(-87.33654f) ? Splat(-87.33654f) : x;
  const Vec magic = Splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  const Vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec y = Splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Every query row of head n. scores: m rows of s_pad floats (s rounded up to whole vectors;
// a slot a row does not see keeps the lowest float, which marks it).
void Head(const Shapes& a, int64_t n, std::vector<float>& scores) {
  const int64_t b = n / (a.n / a.b), s_pad = (a.s + kLanes - 1) / kLanes * kLanes;
  const bool* mask = a.mask + b * a.t * a.s;
  const float* q = a.q + n * a.m * a.d;
  const float* k = a.k + n * a.s * a.d;
  const float* v = a.v + n * a.s * a.d;
  float* out = a.out + n * a.m * a.d;
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  scores.assign(a.m * s_pad, kLowest);
  // the slots some query row sees: [lo, hi); each row's mask once, outside the slot loop
  int64_t lo = a.s, hi = 0;
  for (int64_t t = 0; t < a.t; ++t)
    for (int64_t j = 0; j < a.s; ++j)
      if (mask[t * a.s + j]) lo = std::min(lo, j), hi = std::max(hi, j + 1);
  for (int64_t j = lo; j < hi; ++j) {  // each key row once, for every query row that sees it
    const float* kj = k + j * a.d;
    for (int64_t r = 0, t = 0; r < a.m; ++r, t = t + 1 == a.t ? 0 : t + 1)
      if (mask[t * a.s + j]) scores[r * s_pad + j] = a.scale * Dot(q + r * a.d, kj, a.d);
  }
  const Vec lowest = Splat(kLowest), zero{}, one = Splat(1.0f);
  const Vec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  bool blind = false;  // a row sees no slot: its uniform weights cover every slot
  for (int64_t r = 0; r < a.m; ++r) {
    float* row = scores.data() + r * s_pad;
    Vec top_v = lowest;
    for (int64_t j = 0; j < s_pad; j += kLanes) {
      const Vec x = Load(row + j);
      top_v = x > top_v ? x : top_v;
    }
    float top = kLowest;
    for (int i = 0; i < kLanes; ++i) top = std::max(top, top_v[i]);
    blind |= top == kLowest;
    Vec total_v{};
    for (int64_t j = 0; j < s_pad; j += kLanes) {
      const Vec x = Load(row + j);
      // nothing visible (top is the lowest float): uniform weights over the s slots
      const Vec p = top == kLowest ? (Splat(float(j)) + lane < Splat(float(a.s)) ? one : zero)
                                   : (x > lowest ? Exp(x - top) : zero);
      std::memcpy(row + j, &p, sizeof(p));
      total_v += p;
    }
    const float inv = 1.0f / ppow::HorizontalSum(total_v);
    for (int64_t j = 0; j < s_pad; j += kLanes) {
      const Vec p = Load(row + j) * inv;
      std::memcpy(row + j, &p, sizeof(p));
    }
  }
  std::fill(out, out + a.m * a.d, 0.0f);
  if (blind) lo = 0, hi = a.s;
  for (int64_t j = lo; j < hi; ++j) {  // each value row once
    const float* vj = v + j * a.d;
    for (int64_t r = 0; r < a.m; ++r) {
      const float p = scores[r * s_pad + j];
      if (p != 0.0f) Axpy(p, vj, out + r * a.d, a.d);
    }
  }
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                  ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3 ||
      kd[0] != qd[0] || vd[0] != qd[0] || kd[2] != qd[2] || vd[2] != qd[2] || vd[1] != kd[1] ||
      md[2] != kd[1] || md[0] < 1 || qd[0] % md[0] != 0 || md[1] < 1 || qd[1] % md[1] != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cpu_attention: want q[N, M, D], k and v[N, S, D], mask[B, T, S] with "
                      "B dividing N and T dividing M");
  const Shapes a{q.typed_data(), k.typed_data(), v.typed_data(),
                 reinterpret_cast<const bool*>(mask.typed_data()), out->typed_data(),
                 qd[0], qd[1], kd[1], qd[2], md[0], md[1], scale};
  // one head is a few microseconds at decode sizes: hand heads to other threads only when
  // there is enough work for the hand-off to pay
  const bool threads = a.n > 1 && a.n * a.m * a.s * a.d >= (int64_t{1} << 14);
  if (!threads) {
    std::vector<float> scores;
    for (int64_t n = 0; n < a.n; ++n) Head(a, n, scores);
  } else {
    ppow::ParallelFor(pool, a.n, [&a](int64_t n) {
      std::vector<float> scores;
      Head(a, n, scores);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PpowCpuAttentionF32, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
