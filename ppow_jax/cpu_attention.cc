// Attention of a few query rows against a KV cache in float32, in one call. For every batch
// row b, new token t and query head h = kv * G + g (the G query heads of KV head kv are
// adjacent): out[b, t, h] = softmax(scale * q[b, t, h] . k[b * KV + kv, s] over the slots s that
// mask[b, t, s] allows) . v[b * KV + kv, s]. q and out keep the projections' layout [B, T, H, D]
// (no transposes around the call); the cache is [B * KV, S, D].
//
// A decode step's attention has few query rows (T new tokens times the query heads sharing a
// KV head), and XLA's CPU backend spends far more on the score product with the cache and the
// softmax's small fusions than on reading the cache. Here each key and value row is read once
// for all query rows of its head, and the slots outside the span that the rows see are not
// read (to whole blocks of 16 when the kernel transposes key rows). A query
// row that sees no slot at all gets the mean of every value row, as a softmax over scores that
// are all the lowest float does.
//
// Built into ppow_jax/cpu_gemv.py's library and called through the XLA FFI.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
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
  int64_t b, t, h, kv, s, d;  // batch rows, new tokens, query heads, KV heads, slots, head size
  float scale;
};

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

// Calls f(std::integral_constant<int, C>) for a head size d of C = 1..8 whole vectors and
// returns true; false (nothing called) for other sizes.
template <typename F>
bool ByVectors(int64_t d, F&& f) {
  if (d % kLanes != 0 || d > 8 * kLanes) return false;
  switch (d / kLanes) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
  return true;
}

// Query or output rows whose C vectors each stay in registers together (R * C <= 8).
template <int C>
constexpr int RowsInRegisters() { return C <= 2 ? 4 : C <= 4 ? 2 : 1; }

// Scores of rows [0, m) against key rows [lo, hi) for a head size of C whole vectors: R query
// rows held in vector registers, each key row loaded once per R rows.
template <int C>
void Keys(const Shapes& a, const float* const* q, const float* k, const float* visible,
          float* scores, int64_t s_pad, int64_t lo, int64_t hi, int64_t m) {
  constexpr int R = RowsInRegisters<C>();
  for (int64_t r0 = 0; r0 < m; r0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, m - r0));
    Vec qv[R][C];
    for (int i = 0; i < rows; ++i)
      for (int c = 0; c < C; ++c) qv[i][c] = Load(q[r0 + i] + c * kLanes);
    for (int64_t j = lo; j < hi; ++j) {
      Vec kj[C];
      for (int c = 0; c < C; ++c) kj[c] = Load(k + j * a.d + c * kLanes);
      for (int i = 0; i < R; ++i) {
        if (i >= rows) break;
        const int64_t r = r0 + i;
        if (visible[(r % a.t) * s_pad + j] == 0.0f) continue;
        Vec acc = qv[i][0] * kj[0];
        for (int c = 1; c < C; ++c) acc += qv[i][c] * kj[c];
        scores[r * s_pad + j] = a.scale * ppow::HorizontalSum(acc);
      }
    }
  }
}

// Scores of rows [0, m) against key rows [lo, hi), any head size, 16 slots at a time: the
// block's key rows transposed once into kt[d][16], then a row's 16 scores are D multiply-adds
// of its broadcast elements (no sums across lanes).
void KeysTransposed(const Shapes& a, const float* const* q, const float* k,
                    const float* visible, float* scores, int64_t s_pad, int64_t lo, int64_t hi,
                    int64_t m) {
  std::vector<float> kt(a.d * kLanes);
  const Vec zero{}, lowest = Splat(std::numeric_limits<float>::lowest());
  for (int64_t j0 = lo / kLanes * kLanes; j0 < hi; j0 += kLanes) {
    const int64_t width = std::min<int64_t>(kLanes, a.s - j0);
    for (int64_t i = 0; i < kLanes; ++i)
      for (int64_t e = 0; e < a.d; ++e)
        kt[e * kLanes + i] = i < width ? k[(j0 + i) * a.d + e] : 0.0f;
    for (int64_t r = 0, t = 0; r < m; ++r, t = t + 1 == a.t ? 0 : t + 1) {
      Vec acc{};
      for (int64_t e = 0; e < a.d; ++e) acc += q[r][e] * Load(kt.data() + e * kLanes);
      const Vec sc = Load(visible + t * s_pad + j0) > zero ? acc * a.scale : lowest;
      std::memcpy(scores + r * s_pad + j0, &sc, sizeof(sc));
    }
  }
}

// out rows = weights . v[lo, hi) for a head size of C whole vectors: R rows at a time with
// their R * C partial sums in vector registers, each value row loaded once per R rows.
template <int C, typename At>
void Values(const Shapes& a, const float* v, const float* weights, int64_t s_pad, int64_t lo,
            int64_t hi, int64_t m, const At& at) {
  constexpr int R = RowsInRegisters<C>();
  for (int64_t r0 = 0; r0 < m; r0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, m - r0));
    Vec acc[R][C];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) acc[i][c] = Vec{};
    for (int64_t j = lo; j < hi; ++j) {
      Vec vj[C];
      for (int c = 0; c < C; ++c) vj[c] = Load(v + j * a.d + c * kLanes);
      for (int i = 0; i < R; ++i) {
        if (i >= rows) break;
        const float p = weights[(r0 + i) * s_pad + j];
        for (int c = 0; c < C; ++c) acc[i][c] += p * vj[c];
      }
    }
    for (int i = 0; i < rows; ++i)
      std::memcpy(a.out + at(r0 + i), acc[i], sizeof(acc[i]));
  }
}

// The m = G * T query rows of KV head n = b * KV + kv, row r = g * T + t. scores: m rows of
// s_pad floats (s rounded up to whole vectors; a slot a row does not see keeps the lowest
// float, which marks it).
void Head(const Shapes& a, int64_t n, std::vector<float>& scores) {
  const int64_t b = n / a.kv, kv = n % a.kv, g_size = a.h / a.kv, m = g_size * a.t;
  const int64_t s_pad = (a.s + kLanes - 1) / kLanes * kLanes;
  const bool* mask = a.mask + b * a.t * a.s;
  // where q[b, t, kv * G + g] and out[b, t, kv * G + g] start, for row r = g * T + t
  const auto at = [&](int64_t r) {
    return ((b * a.t + r % a.t) * a.h + kv * g_size + r / a.t) * a.d;
  };
  const float* k = a.k + n * a.s * a.d;
  const float* v = a.v + n * a.s * a.d;
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  scores.assign(m * s_pad, kLowest);
  // the slots some query row sees: [lo, hi); each row's mask once, outside the slot loop.
  // blind: a token sees no slot (a padding row)
  int64_t lo = a.s, hi = 0;
  bool blind = false;
  for (int64_t t = 0; t < a.t; ++t) {
    bool any = false;
    for (int64_t j = 0; j < a.s; ++j)
      if (mask[t * a.s + j]) lo = std::min(lo, j), hi = std::max(hi, j + 1), any = true;
    blind |= !any;
  }
  std::vector<const float*> q(m);
  for (int64_t r = 0; r < m; ++r) q[r] = a.q + at(r);
  // visible[t][j]: 1 where token t sees slot j, else 0 (and past s)
  std::vector<float> visible(a.t * s_pad, 0.0f);
  for (int64_t t = 0; t < a.t; ++t)
    for (int64_t j = lo; j < hi; ++j) visible[t * s_pad + j] = mask[t * a.s + j] ? 1.0f : 0.0f;
  // few rows: each row's products with a key row summed across lanes (Keys); from about D / 4
  // rows on, transposing the key rows once costs less than those sums (BENCHMARKS.md)
  const auto keys = [&](auto c) {
    Keys<decltype(c)::value>(a, q.data(), k, visible.data(), scores.data(), s_pad, lo, hi, m);
  };
  if (m >= std::max<int64_t>(8, a.d / 4) || !ByVectors(a.d, keys))
    KeysTransposed(a, q.data(), k, visible.data(), scores.data(), s_pad, lo, hi, m);
  // softmax over the blocks of slots [lo, hi) touches; a blind token gets uniform weights
  // over every slot, and then every row's weights cover every slot
  if (blind) lo = 0, hi = a.s;
  const int64_t j_lo = blind ? 0 : lo / kLanes * kLanes;
  const int64_t j_hi = blind ? s_pad : (hi + kLanes - 1) / kLanes * kLanes;
  const Vec lowest = Splat(kLowest), zero{}, one = Splat(1.0f);
  const Vec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t r = 0; r < m; ++r) {
    float* row = scores.data() + r * s_pad;
    Vec top_v = lowest;
    for (int64_t j = j_lo; j < j_hi; j += kLanes) {
      const Vec x = Load(row + j);
      top_v = x > top_v ? x : top_v;
    }
    float top = kLowest;
    for (int i = 0; i < kLanes; ++i) top = std::max(top, top_v[i]);
    Vec total_v{};
    for (int64_t j = j_lo; j < j_hi; j += kLanes) {
      const Vec x = Load(row + j);
      // nothing visible (top is the lowest float): uniform weights over the s slots
      const Vec p = top == kLowest ? (Splat(float(j)) + lane < Splat(float(a.s)) ? one : zero)
                                   : (x > lowest ? Exp(x - top) : zero);
      std::memcpy(row + j, &p, sizeof(p));
      total_v += p;
    }
    const float inv = 1.0f / ppow::HorizontalSum(total_v);
    for (int64_t j = j_lo; j < j_hi; j += kLanes) {
      const Vec p = Load(row + j) * inv;
      std::memcpy(row + j, &p, sizeof(p));
    }
  }
  const auto values = [&](auto c) {
    Values<decltype(c)::value>(a, v, scores.data(), s_pad, lo, hi, m, at);
  };
  if (ByVectors(a.d, values)) return;
  std::vector<float*> out(m);  // any head size: one output row at a time in memory
  for (int64_t r = 0; r < m; ++r) {
    out[r] = a.out + at(r);
    std::fill(out[r], out[r] + a.d, 0.0f);
  }
  for (int64_t j = lo; j < hi; ++j) {  // each value row once
    const float* vj = v + j * a.d;
    for (int64_t r = 0; r < m; ++r) {
      const float p = scores[r * s_pad + j];
      if (p != 0.0f) Axpy(p, vj, out[r], a.d);
    }
  }
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                  ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             md = mask.dimensions();
  const bool ranks = qd.size() == 4 && kd.size() == 3 && vd.size() == 3 && md.size() == 3;
  if (!ranks || qd[0] < 1 || kd[0] % qd[0] != 0 || kd[0] < qd[0] || qd[2] % (kd[0] / qd[0]) ||
      vd[0] != kd[0] || vd[1] != kd[1] || kd[2] != qd[3] || vd[2] != qd[3] || md[0] != qd[0] ||
      md[1] != qd[1] || md[2] != kd[1])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cpu_attention: want q[B, T, H, D], k and v[B * KV, S, D] with KV "
                      "dividing H, mask[B, T, S]");
  const Shapes a{q.typed_data(), k.typed_data(), v.typed_data(),
                 reinterpret_cast<const bool*>(mask.typed_data()), out->typed_data(),
                 qd[0], qd[1], qd[2], kd[0] / qd[0], kd[1], qd[3], scale};
  // a head is a few microseconds at decode sizes: hand heads to other threads only when there
  // is enough work for the hand-off to pay
  const int64_t heads = a.b * a.kv;
  const bool threads = heads > 1 && a.b * a.t * a.h * a.s * a.d >= (int64_t{1} << 14);
  if (!threads) {
    std::vector<float> scores;
    for (int64_t n = 0; n < heads; ++n) Head(a, n, scores);
  } else {
    ppow::ParallelFor(pool, heads, [&a](int64_t n) {
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
