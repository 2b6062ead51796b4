// chatforge's weight-only int8 products for decode: y = x @ (q * scale[:, None]).T + bias, with q an
// (out, in) int8 matrix, one fp32 scale per output channel, x and y fp32. Decode reads every weight
// once a token, so a weight stored in 8 bits streams four times faster than in fp32; the work here is
// to keep the widening of the weights (int8 -> int32 -> fp32) under that stream.
//
// Each tile is OB outputs (OB weight rows, read as OB sequential streams) times RB rows of x: OB x RB
// accumulators; every OB-wide group of weight vectors is widened once and used for RB rows; x's
// vectors are loaded once and used for OB outputs. The sum runs in fp32 over the int8 values, then is
// scaled and biased once per output, so the result equals the dequantized fp32 product to fp32
// rounding. A tile prefetches the next tile's weights (the OB rows after its own, contiguous) into L2
// as one linear stream, OB lines per 64 bytes of its own progress: one row at 2 threads ran 1.4x
// faster than prefetching each stream 4 KB ahead on its own, and 1.3x faster than no prefetch.
// Threads split the outputs (at::parallel_for, torch's OpenMP pool).
//
// One source for three instruction sets, picked by the compiler's flags: AVX-512F (16 floats a
// vector; -mavx512f: _mm512_cvtepi8_epi32 widens 16 int8 in AVX-512F alone), AVX2 + FMA (8 floats;
// -mavx2 -mfma), and plain C++ otherwise. Only the few wrappers below differ between them.
// CHATFORGE_INT8_SIMDE_AVX512 (tests only) builds the AVX-512 wrappers on SIMDe's portable
// implementation of those intrinsics, so a machine without AVX-512 can check that code's results;
// CHATFORGE_INT8_NS names the op namespace (tests build these variants beside the real extension).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(CHATFORGE_INT8_SIMDE_AVX512)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstring>
// SIMDe (0.7, 0.8) lacks these two: the same from its parts
inline simde__m512i chatforge_simde_cvtepi8_epi32(simde__m128i a) {
  int8_t b[16];
  int32_t w[16];
  std::memcpy(b, &a, 16);
  for (int i = 0; i < 16; ++i) w[i] = b[i];
  return simde_mm512_loadu_si512(w);
}
inline float chatforge_simde_reduce_add_ps(simde__m512 v) {
  float f[16], s = 0.0f;
  simde_mm512_storeu_ps(f, v);
  for (int i = 0; i < 16; ++i) s += f[i];
  return s;
}
#define _mm512_cvtepi8_epi32(a) chatforge_simde_cvtepi8_epi32(a)
#define _mm512_reduce_add_ps(v) chatforge_simde_reduce_add_ps(v)
#define CHATFORGE_INT8_AVX512 1
#elif defined(__AVX512F__)
#include <immintrin.h>
#define CHATFORGE_INT8_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CHATFORGE_INT8_AVX2 1
#endif

#ifndef CHATFORGE_INT8_NS
#define CHATFORGE_INT8_NS chatforge_cpu
#endif
#define CHATFORGE_INT8_STR2(s) #s
#define CHATFORGE_INT8_STR(s) CHATFORGE_INT8_STR2(s)

namespace {

// ---- the vector wrappers: all that differs between instruction sets ---------------------------------
#if defined(CHATFORGE_INT8_AVX512)
using vec = __m512;
constexpr int kWidth = 16;
const char* const kIsa = "avx512";
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
// 16 int8 -> 16 fp32 (vpmovsxbd + vcvtdq2ps: AVX-512F)
inline vec vload_q(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
#elif defined(CHATFORGE_INT8_AVX2)
using vec = __m256;
constexpr int kWidth = 8;
const char* const kIsa = "avx2";
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
// 8 int8 -> 8 fp32 (vpmovsxbd + vcvtdq2ps)
inline vec vload_q(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
#else
using vec = float;
constexpr int kWidth = 1;
const char* const kIsa = "scalar";
inline vec vzero() { return 0.0f; }
inline vec vload(const float* p) { return *p; }
inline vec vload_q(const int8_t* p) { return float(*p); }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline float vsum(vec v) { return v; }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
#endif

// ---- tiles ---------------------------------------------------------------------------------------------
constexpr int64_t kLine = 64;  // bytes of one weight stream per prefetch: one cache line of int8

// Outputs o..o+OB-1 for rows m..m+RB-1 of x [M, K] (row stride K): y[m + r][o + j] =
// scale[o + j] * sum_k x[m + r][k] q[o + j][k] + bias[o + j]. With `prefetch`, the weights of the
// next tile (outputs o+OB..o+2OB-1) stream into L2 while this one runs.
template <int OB, int RB>
void tile(const int8_t* Q, const float* X, const float* S, const float* B, float* Y, int64_t K, int64_t O, int64_t o,
          int64_t m, bool prefetch) {
  vec acc[OB][RB];
  for (int j = 0; j < OB; ++j)
    for (int r = 0; r < RB; ++r) acc[j][r] = vzero();
  const int8_t* q = Q + o * K;
  const float* x = X + m * K;
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    if (prefetch)  // the next tile's weights (OB rows of K, contiguous), read as one linear stream
      for (int j = 0; j < OB; ++j) prefetch_l2(q + OB * K + k * OB + j * kLine);
    for (int64_t c = 0; c < kLine; c += kWidth) {
      vec w[OB];
      for (int j = 0; j < OB; ++j) w[j] = vload_q(q + j * K + k + c);
      for (int r = 0; r < RB; ++r) {
        const vec xv = vload(x + r * K + k + c);
        for (int j = 0; j < OB; ++j) acc[j][r] = vfma(w[j], xv, acc[j][r]);
      }
    }
  }
  for (; k + kWidth <= K; k += kWidth) {
    vec w[OB];
    for (int j = 0; j < OB; ++j) w[j] = vload_q(q + j * K + k);
    for (int r = 0; r < RB; ++r) {
      const vec xv = vload(x + r * K + k);
      for (int j = 0; j < OB; ++j) acc[j][r] = vfma(w[j], xv, acc[j][r]);
    }
  }
  for (int j = 0; j < OB; ++j) {
    const float s = S[o + j], b = B ? B[o + j] : 0.0f;
    for (int r = 0; r < RB; ++r) {
      float t = vsum(acc[j][r]);
      for (int64_t i = k; i < K; ++i) t += x[r * K + i] * float(q[j * K + i]);
      Y[(m + r) * O + o + j] = t * s + b;
    }
  }
}

// the tile of `rows` (1..RB) rows, at compile time
template <int OB, int RB>
void tile_rows(const int8_t* Q, const float* X, const float* S, const float* B, float* Y, int64_t K, int64_t O,
               int64_t o, int64_t m, int64_t rows, bool prefetch) {
  if constexpr (RB > 0) {
    if (rows == RB) return tile<OB, RB>(Q, X, S, B, Y, K, O, o, m, prefetch);
    tile_rows<OB, RB - 1>(Q, X, S, B, Y, K, O, o, m, rows, prefetch);
  }
}

// Outputs [begin, end) for all M rows: tiles of OB outputs (then single outputs for the rest), each
// over the rows in tiles of RB; only the first row tile of an output tile prefetches (the later ones
// find its weights in L1).
template <int OB, int RB>
void outputs(const int8_t* Q, const float* X, const float* S, const float* B, float* Y, int64_t K, int64_t O,
             int64_t M, int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + OB <= end; o += OB)
    for (int64_t m = 0; m < M; m += RB) tile_rows<OB, RB>(Q, X, S, B, Y, K, O, o, m, std::min<int64_t>(RB, M - m), m == 0);
  for (; o < end; ++o)
    for (int64_t m = 0; m < M; m += RB) tile_rows<1, RB>(Q, X, S, B, Y, K, O, o, m, std::min<int64_t>(RB, M - m), m == 0);
}

// Tile shapes, measured on GPT-2 small's decode products (AVX2, Zen 3, see chatforge/accel/int8.py):
// one row 4 outputs (4 streams share each x load and hide the FMA latency; 2 and 8 were slower),
// two rows 4 x 2, three or more 3 x 4 (12 accumulators + 3 weights + x: the 16 AVX2 registers;
// 2 x 6 and 4 x 2 were slower, 4 x 3 spills). AVX-512's 32 registers take 4 x 6.
#if defined(CHATFORGE_INT8_AVX512)
constexpr int kManyOB = 4, kManyRB = 6;
#else
constexpr int kManyOB = 3, kManyRB = 4;
#endif

using Kernel = void (*)(const int8_t*, const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

}  // namespace

// What kernels.cpp's DecodeStep calls for a model in int8 (hidden: each extension keeps its own).
namespace chatforge_int8 {
#define CHATFORGE_INT8_HIDDEN __attribute__((visibility("hidden")))

// Outputs a tile covers for `rows` rows: a thread's share of the outputs starts at a multiple of it.
CHATFORGE_INT8_HIDDEN int64_t tile_outputs(int64_t rows) { return rows <= 2 ? 4 : kManyOB; }

// y[m][o] = scale[o] * sum_k x[m][k] q[o][k] + bias[o] for rows m < rows and outputs o in [begin, end)
// (begin a multiple of tile_outputs(rows)); bias may be null.
CHATFORGE_INT8_HIDDEN void product_range(const int8_t* Q, const float* X, const float* S, const float* B, float* Y,
                                         int64_t K, int64_t O, int64_t rows, int64_t begin, int64_t end) {
  const Kernel kernel = rows == 1 ? &outputs<4, 1> : rows == 2 ? &outputs<4, 2> : &outputs<kManyOB, kManyRB>;
  kernel(Q, X, S, B, Y, K, O, rows, begin, end);
}

// Tiles a thread takes at least: ~16 KB of weights apiece.
CHATFORGE_INT8_HIDDEN int64_t grain(int64_t K, int64_t rows) {
  return std::max<int64_t>(1, 16384 / (K * tile_outputs(rows)));
}
}  // namespace chatforge_int8

namespace {

// x [..., K] (fp32) times the int8 weight [O, K] with per-output scales [O], plus bias [O] or none.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  const char* op = CHATFORGE_INT8_STR(CHATFORGE_INT8_NS) "::int8_linear";
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu(), op, " takes CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be fp32, not ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, op, ": the weight must be a 2-D int8 tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == qweight.size(1), op, ": x has ", x.dim() ? x.size(-1) : 0,
              " features, the weight ", qweight.size(1));
  const int64_t O = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == O, op, ": the scale must be ", O, " fp32 values");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->numel() == O && bias->device().is_cpu()), op,
              ": the bias must be ", O, " fp32 values");
  const at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scale.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  at::Tensor y = at::empty(shape, x.options());
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  if (y.numel() == 0) return y;
  if (K == 0) return has_bias ? y.copy_(bc.expand_as(y)) : y.zero_();
  const int8_t* Q = qc.data_ptr<int8_t>();
  const float* X = xc.data_ptr<float>();
  const float* S = sc.data_ptr<float>();
  const float* B = has_bias ? bc.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  const int64_t ob = chatforge_int8::tile_outputs(rows), tiles = (O + ob - 1) / ob;
  at::parallel_for(0, tiles, chatforge_int8::grain(K, rows), [&](int64_t begin, int64_t end) {  // whole tiles a thread
    chatforge_int8::product_range(Q, X, S, B, Y, K, O, rows, begin * ob, std::min(end * ob, O));
  });
  return y;
}

std::string int8_isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(CHATFORGE_INT8_NS, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int8_isa() -> str", &int8_isa);
}
TORCH_LIBRARY_IMPL(CHATFORGE_INT8_NS, CPU, m) { m.impl("int8_linear", &int8_linear); }
