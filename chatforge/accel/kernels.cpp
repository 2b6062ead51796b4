// chatforge's fp32 CPU products for decode: one row (gemv) and several rows (a panel-packed gemm),
// both prefetching the weight stream 4 KB ahead of the loads; and on them DecodeStep, a whole decode
// step of the GPT in one call. One source, compiled once per instruction set by chatforge/accel/kernels.py
// (torch.utils.cpp_extension): with -mavx512f -mfma (16 floats a vector) and with -mavx2 -mfma (8); every
// vector operation below goes through `Vec`, the only place the two differ. Measured against the products
// torch calls in chatforge/accel/kernels.py's docstring.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

// kernels_int8.cpp's products, for a DecodeStep whose weights are int8 (same extension)
namespace chatforge_int8 {
int64_t tile_outputs(int64_t rows);
void product_range(const int8_t* Q, const float* X, const float* S, const float* B, float* Y, int64_t K, int64_t O,
                   int64_t rows, int64_t begin, int64_t end);
int64_t grain(int64_t K, int64_t rows);
}  // namespace chatforge_int8

namespace {
#if defined(__AVX512F__) && defined(__FMA__)
// One AVX-512 register of 16 floats; a tail of n < 16 lanes through a mask register.
struct Vec {
  using R = __m512;
  using M = __mmask16;
  static constexpr int64_t W = 16;
  static constexpr const char* kName = "avx512";
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float a) { return _mm512_set1_ps(a); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static M mask(int64_t n) { return (M)((1u << n) - 1); }  // the first n lanes, 0 <= n <= W
  static R load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }  // zeros past the mask
  static void store(M m, float* p, R v) { _mm512_mask_storeu_ps(p, m, v); }
  static R keep(M m, R v) { return _mm512_maskz_mov_ps(m, v); }  // zeros past the mask
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static float sum(R v) { return _mm512_reduce_add_ps(v); }
  static R round(R v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scale2(R p, R n) { return _mm512_scalef_ps(p, n); }  // p 2^n for integral n
};
#elif defined(__AVX2__) && defined(__FMA__)
// One AVX2 register of 8 floats; a tail of n < 8 lanes through an integer lane mask (vmaskmovps).
struct Vec {
  using R = __m256;
  using M = __m256i;
  static constexpr int64_t W = 8;
  static constexpr const char* kName = "avx2";
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float a) { return _mm256_set1_ps(a); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static M mask(int64_t n) {  // the first n lanes, 0 <= n <= W: a window into 8 ones then 8 zeros
    alignas(64) static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i*)(lanes + 8 - n));
  }
  static R load(M m, const float* p) { return _mm256_maskload_ps(p, m); }  // zeros past the mask, no fault
  static void store(M m, float* p, R v) { _mm256_maskstore_ps(p, m, v); }
  static R keep(M m, R v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static R round(R v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scale2(R p, R n) {  // p 2^n for integral n in [-126, 127]: n written into a float's exponent
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
#else
#error "chatforge's CPU kernels are built with -mavx512f -mfma or -mavx2 -mfma (see chatforge/accel/kernels.py)"
#endif
using Reg = Vec::R;  // one vector register

// How far ahead of the loads the weight stream is prefetched, and where to: 4 KB (2, 4, 8 and 16 KB
// measured; 4-8 KB best, 6-7% faster than none for GPT-2 small's 49 one-row products), into L2
// (_MM_HINT_T1: another 10-11% over prefetching into L1, paired; L1's few fill buffers cap how
// many lines can be on their way there). Measured on the AVX-512 Xeon.
constexpr int64_t kAhead = 1024;

// One row of x times the weight, a group of output rows at a time, 64 floats (four cache lines) of
// the weight a k step in 64 / W accumulators (4 of AVX-512, 8 of AVX2) to hide the FMA latency:
// AVX-512 one output row at a time, a single sequential stream per thread (on the Xeon); AVX2 8 rows at
// a time, 8 streams of 8 floats a step with one accumulator each (on the EPYC: 1.27x one stream, paired
// in one build, 49 products at 2 threads; 10 or 12 rows the same, 16 slower, 6 rows of 2 accumulators
// 1.1x).
constexpr int kAcc = 64 / Vec::W;
constexpr int kGemvRows = Vec::W == 16 ? 1 : 8;

// Whether the one-row-at-a-time product prefetches its stream kAhead floats ahead into L2: on by
// default, what the Xeon wants (above); chatforge/accel/kernels.py turns it off on AMD, where the
// hardware prefetcher alone streams faster (EPYC, one row at a time: 1.09-1.12x without). The groups of
// 8 rows never prefetch, and the product with panels always does (without: 0.85-0.95x on the EPYC).
bool g_gemv_prefetch = true;

bool gemv_prefetch(bool on) {
  const bool before = g_gemv_prefetch;
  g_gemv_prefetch = on;
  return before;
}

// a[0] + ... + a[N-1] pairwise: (a0 + a1) + (a2 + a3), ...
template <int N>
inline Reg tree_sum(const Reg* a) {
  if constexpr (N == 1) return a[0];
  else return Vec::add(tree_sum<N / 2>(a), tree_sum<N / 2>(a + N / 2));
}

// outputs o..o+ROWS-1: ROWS streams, kAcc / ROWS accumulators each (at least one)
template <int ROWS>
void gemv_group(const float* W, const float* X, const float* B, float* Y, int64_t K, int64_t o, bool prefetch) {
  constexpr int acc = std::max(1, kAcc / ROWS);
  constexpr int64_t step = acc * Vec::W;
  const int64_t K_steps = K - K % step;
  const float* w = W + o * K;
  Reg a[ROWS][acc];
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < acc; ++i) a[r][i] = Vec::zero();
  int64_t k = 0;
  for (; k < K_steps; k += step) {
    if (ROWS == 1 && prefetch)
      for (int64_t line = 0; line < step * 4; line += 64) _mm_prefetch((const char*)(w + k + kAhead) + line, _MM_HINT_T1);
    for (int i = 0; i < acc; ++i) {
      const Reg x = Vec::load(X + k + i * Vec::W);
      for (int r = 0; r < ROWS; ++r) a[r][i] = Vec::fma(Vec::load(w + r * K + k + i * Vec::W), x, a[r][i]);
    }
  }
  for (; k + Vec::W <= K; k += Vec::W) {
    const Reg x = Vec::load(X + k);
    for (int r = 0; r < ROWS; ++r) a[r][0] = Vec::fma(Vec::load(w + r * K + k), x, a[r][0]);
  }
  if (K % Vec::W) {
    const auto m = Vec::mask(K % Vec::W);
    const Reg x = Vec::load(m, X + k);
    constexpr int last = acc > 1 ? 1 : 0;
    for (int r = 0; r < ROWS; ++r) a[r][last] = Vec::fma(Vec::load(m, w + r * K + k), x, a[r][last]);
  }
  for (int r = 0; r < ROWS; ++r) {
    const float s = Vec::sum(tree_sum<acc>(a[r]));
    Y[o + r] = B ? s + B[o + r] : s;
  }
}

void gemv_rows(const float* W, const float* X, const float* B, float* Y, int64_t K, int64_t begin, int64_t end) {
  const bool prefetch = g_gemv_prefetch;
  int64_t o = begin;
  for (; o + kGemvRows <= end; o += kGemvRows) gemv_group<kGemvRows>(W, X, B, Y, K, o, prefetch);
  for (; o < end; ++o) gemv_group<1>(W, X, B, Y, K, o, prefetch);
}

// Output columns per packed panel: 16 in both builds, one AVX-512 vector or two AVX2 vectors. A tile
// multiplies up to kTileRows rows of x by one panel, in kTileRows x kPanelVecs accumulators with the
// panel's vectors and a broadcast of x beside them in registers: AVX-512 (32 registers) 16 rows, AVX2
// (16 registers) 6. (On AVX2, tiles of one vector of 8 columns and up to 12 rows, over each half of the
// panel, were 0-30% slower than 6-row tiles of both halves at 2-12 rows on the EPYC, paired in one build.)
constexpr int kPanelVecs = Vec::W == 16 ? 1 : 2;
constexpr int64_t kPanel = kPanelVecs * Vec::W;
constexpr int kTileRows = Vec::W == 16 ? 16 : 6;

// W [O, K] -> panels of kPanel columns, each [K][kPanel] (zero-padded past O): the layout in
// which one k step of a tile reads kPanelVecs whole vectors, and a panel is one sequential stream.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dtype() == torch::kFloat && weight.dim() == 2, "chatforge_cpu::pack takes a 2-D fp32 weight");
  const auto wc = weight.contiguous();
  const int64_t O = wc.size(0), K = wc.size(1), panels = (O + kPanel - 1) / kPanel;
  auto packed = torch::zeros({panels, K, kPanel}, wc.options());
  const float* W = wc.data_ptr<float>();
  float* P = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < kPanel && p * kPanel + c < O; ++c) {
        const float* src = W + (p * kPanel + c) * K;
        float* dst = P + p * K * kPanel + c;
        for (int64_t k = 0; k < K; ++k) dst[k * kPanel] = src[k];
      }
  });
  return packed;
}

int64_t panel_width() { return kPanel; }
std::string isa() { return Vec::kName; }

// x [M, K] -> xt [K, M]: a k step of a tile then broadcasts its rows' values from one cache line
void transpose(const float* x, int64_t M, int64_t K, float* xt) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * M + m] = x[m * K + k];
}

// What a tile prefetches into L2 while it computes: its own panel 4 KB ahead of its loads (`own`, a
// line a k step), and/or a share of the next panel (`next`, a line every `every` k steps).
struct Fetch {
  const char* own = nullptr;
  const char* next = nullptr;
  int64_t every = 1;
};

// Whether the tiles of a panel spread the prefetch of the next panel between them (AVX2), or only the
// first tile prefetches its own panel (AVX-512, as measured there). Where a panel takes several tiles,
// the first streams it from memory and the later ones compute from cache, so without spreading the
// memory is idle while they run; spread, the whole product streams at the pace of its arithmetic. On the
// EPYC (AVX2, GPT-2 small's products, one thread, paired in one build): 1.24-1.37x at 8-12 rows, 1.09-
// 1.14x at 16-24, 1.08x at 32. A panel of one tile keeps its own prefetch (spread, one panel ahead, was
// 0.92x at 2 rows).
constexpr bool kSpread = Vec::W == 8;

// R rows (m..m+R-1) of x times the panel of outputs o..o+kPanel-1: R x kPanelVecs accumulators, x
// broadcast one element at a time from xt [K, M]
template <int R>
void panel_tile(const float* P, const float* XT, const float* B, float* Y, int64_t K, int64_t M, int64_t O,
                int64_t o, int64_t m, Fetch fetch) {
  Reg acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = Vec::zero();
  int64_t due = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = P + k * kPanel;
    if (fetch.own) _mm_prefetch(fetch.own + k * kPanel * sizeof(float), _MM_HINT_T1);
    if (fetch.next && k == due) {
      _mm_prefetch(fetch.next, _MM_HINT_T1);
      fetch.next += 64;
      due += fetch.every;
    }
    Reg wv[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) wv[v] = Vec::load(w + v * Vec::W);
    const float* x = XT + k * M + m;
    for (int r = 0; r < R; ++r) {
      const Reg xr = Vec::set1(x[r]);
      for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = Vec::fma(xr, wv[v], acc[r][v]);
    }
  }
  for (int v = 0; v < kPanelVecs; ++v) {
    const int64_t col = o + v * Vec::W, cols = std::clamp<int64_t>(O - col, 0, Vec::W);
    if (cols == 0) break;
    const auto mask = Vec::mask(cols);
    const Reg b = B ? Vec::load(mask, B + col) : Vec::zero();
    for (int r = 0; r < R; ++r) Vec::store(mask, Y + (m + r) * O + col, Vec::add(acc[r][v], b));
  }
}

// panel_tile<rows> for a run-time rows <= R
template <int R>
void panel_rest(const float* P, const float* XT, const float* B, float* Y, int64_t K, int64_t M, int64_t O, int64_t o,
                int64_t m, int64_t rows, Fetch fetch) {
  if constexpr (R > 0) {
    if (rows == R) return panel_tile<R>(P, XT, B, Y, K, M, O, o, m, fetch);
    panel_rest<R - 1>(P, XT, B, Y, K, M, O, o, m, rows, fetch);
  }
}

// What tile t of `tiles` over a panel prefetches: spread (kSpread, several tiles) its share of the next
// panel (none after a thread's last panel) and, in the first panel a thread computes, the first tile its
// own panel too; otherwise the first tile its own panel.
Fetch tile_fetch(const float* P, const float* next, bool first_panel, int64_t K, int64_t t, int64_t tiles) {
  const bool spread = kSpread && tiles > 1;
  Fetch f;
  if (t == 0 && (first_panel || !spread)) f.own = (const char*)(P + kAhead);
  if (spread && next) {
    f.next = (const char*)next + t * ((K + tiles - 1) / tiles) * kPanel * sizeof(float);
    f.every = tiles;
  }
  return f;
}

// All M rows times the panel at output o (`next`: the panel this thread computes after it, or null), in
// as few tiles as kTileRows allows, of equal size (17 rows: 9 and 8, not 16 and 1), since a tile's
// accumulators hide the FMA latency only when there are enough of them. Each reads the panel once: the
// first from memory, the others from cache.
void panel_rows(const float* P, const float* XT, const float* B, float* Y, int64_t K, int64_t O, int64_t M, int64_t o,
                const float* next, bool first_panel) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t t = 0, m = 0; t < tiles; ++t) {
    const int64_t rows = (M - m + tiles - t - 1) / (tiles - t);
    panel_rest<kTileRows>(P, XT, B, Y, K, M, O, o, m, rows, tile_fetch(P, next, first_panel, K, t, tiles));
    m += rows;
  }
}

// panels [begin, end) of a packed weight P (one thread's share)
void panel_range(const float* P, const float* XT, const float* B, float* Y, int64_t K, int64_t O, int64_t M,
                 int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p)
    panel_rows(P + p * K * kPanel, XT, B, Y, K, O, M, p * kPanel, p + 1 < end ? P + (p + 1) * K * kPanel : nullptr,
               p == begin);
}

// What both products share: x made contiguous, the bias checked, and y [..., O] allocated.
struct Operands {
  torch::Tensor x, bias, y;
  const float* X;
  const float* B;
  float* Y;
};

Operands operands(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t O, const char* op) {
  Operands o;
  o.x = x.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dtype() == torch::kFloat && bias->numel() == O, op, ": the bias must be ", O, " fp32 values");
    o.bias = bias->contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  o.y = torch::empty(shape, x.options());
  o.X = o.x.data_ptr<float>();
  o.B = has_bias ? o.bias.data_ptr<float>() : nullptr;
  o.Y = o.y.data_ptr<float>();
  return o;
}

// x [..., K] times a packed weight of O outputs.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t O,
                            const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat && packed.dtype() == torch::kFloat, "chatforge_cpu::packed_linear is fp32 only");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && x.size(-1) == packed.size(1) && packed.size(2) == kPanel &&
                  packed.size(0) == (O + kPanel - 1) / kPanel,
              "chatforge_cpu::packed_linear: x and the packed weight do not match");
  const int64_t K = packed.size(1), M = x.numel() / K;
  const Operands t = operands(x, bias, O, "chatforge_cpu::packed_linear");
  const float* P = packed.data_ptr<float>();
  auto xt = torch::empty({K, M}, x.options());
  transpose(t.X, M, K, xt.data_ptr<float>());
  const float* XT = xt.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    panel_range(P, XT, t.B, t.Y, K, O, M, begin, end);
  });
  return t.y;
}

// one row x [..., K] (all leading sizes 1) times weight [O, K]
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat && weight.dtype() == torch::kFloat, "chatforge_cpu::linear is fp32 only");
  TORCH_CHECK(weight.dim() == 2, "chatforge_cpu::linear: the weight must be 2-D");
  TORCH_CHECK(x.size(-1) == weight.size(1), "chatforge_cpu::linear: x has ", x.size(-1), " features, weight ",
              weight.size(1));
  const int64_t O = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.numel() == K, "chatforge_cpu::linear takes one row; use packed_linear for more");
  const auto w = weight.contiguous();
  const Operands t = operands(x, bias, O, "chatforge_cpu::linear");
  const float* W = w.data_ptr<float>();
  at::parallel_for(0, O, 256, [&](int64_t begin, int64_t end) { gemv_rows(W, t.X, t.B, t.Y, K, begin, end); });
  return t.y;
}

// ---- one decode step of the whole GPT, in one call ---------------------------------------------------
// chatforge.model.GPT's forward for one new token on each of R rows (embeddings, pre-LayerNorm blocks of
// attention and GELU MLP, final LayerNorm, LM head), each row at its own position in its own cache row.
// Its products are the kernels above (the gemv for one row, the packed product for more), so a step costs
// what its weight stream costs: there is no graph, guard or op dispatch between them.

// exp(x) for a vector: x = n ln2 + r, exp(r) by Cephes' expf polynomial, then 2^n
inline Reg vexp(Reg x) {
  x = Vec::min(Vec::max(x, Vec::set1(-87.0f)), Vec::set1(88.0f));
  const Reg n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  Reg r = Vec::fnma(n, Vec::set1(0.693359375f), x);
  r = Vec::fnma(n, Vec::set1(-2.12194440e-4f), r);
  Reg p = Vec::set1(1.9875691500e-4f);
  p = Vec::fma(p, r, Vec::set1(1.3981999507e-3f));
  p = Vec::fma(p, r, Vec::set1(8.3334519073e-3f));
  p = Vec::fma(p, r, Vec::set1(4.1665795894e-2f));
  p = Vec::fma(p, r, Vec::set1(1.6666665459e-1f));
  p = Vec::fma(p, r, Vec::set1(5.0000001201e-1f));
  p = Vec::fma(p, Vec::mul(r, r), Vec::add(r, Vec::set1(1.0f)));
  return Vec::scale2(p, n);
}

// the lanes of the chunk at i of n values
inline Vec::M chunk_mask(int64_t i, int64_t n) { return Vec::mask(std::min<int64_t>(Vec::W, n - i)); }

// GPT-2's GELU (tanh approximation) in place, as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
void gelu_tanh(float* x, int64_t n) {
  const Reg c = Vec::set1(-2.0f * 0.7978845608028654f), a = Vec::set1(0.044715f);
  for (int64_t i = 0; i < n; i += Vec::W) {
    const auto m = chunk_mask(i, n);
    const Reg v = Vec::load(m, x + i);
    const Reg u = Vec::mul(c, Vec::fma(Vec::mul(a, v), Vec::mul(v, v), v));
    Vec::store(m, x + i, Vec::div(v, Vec::add(Vec::set1(1.0f), vexp(u))));
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  Reg acc = Vec::zero();
  for (int64_t i = 0; i < n; i += Vec::W) {
    const auto m = chunk_mask(i, n);
    acc = Vec::fma(Vec::load(m, a + i), Vec::load(m, b + i), acc);
  }
  return Vec::sum(acc);
}

// y += a * x
inline void axpy(float* y, float a, const float* x, int64_t n) {
  const Reg va = Vec::set1(a);
  for (int64_t i = 0; i < n; i += Vec::W) {
    const auto m = chunk_mask(i, n);
    Vec::store(m, y + i, Vec::fma(va, Vec::load(m, x + i), Vec::load(m, y + i)));
  }
}

// y = (x - mean) / sqrt(var + eps) * w + b over n values (two passes, as torch's kernel)
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
  Reg acc = Vec::zero();
  for (int64_t i = 0; i < n; i += Vec::W) acc = Vec::add(acc, Vec::load(chunk_mask(i, n), x + i));
  const Reg mean = Vec::set1(Vec::sum(acc) / n);
  acc = Vec::zero();
  for (int64_t i = 0; i < n; i += Vec::W) {
    const auto m = chunk_mask(i, n);
    const Reg d = Vec::keep(m, Vec::sub(Vec::load(m, x + i), mean));
    acc = Vec::fma(d, d, acc);
  }
  const Reg rstd = Vec::set1(1.0f / std::sqrt(Vec::sum(acc) / n + eps));
  for (int64_t i = 0; i < n; i += Vec::W) {
    const auto m = chunk_mask(i, n);
    const Reg d = Vec::mul(Vec::sub(Vec::load(m, x + i), mean), rstd);
    Vec::store(m, y + i, Vec::fma(d, Vec::load(m, w + i), Vec::load(m, b + i)));
  }
}

// What a product does with its result: store it, add it to the residual stream, or store its GELU.
enum class Then { Store, Add, Gelu };

struct DecodeStep : torch::CustomClassHolder {
  // The weights in the order of GPT's forward: wte, wpe; per block ln_1 (w, b), c_attn (w, b),
  // attn.c_proj (w, b), ln_2 (w, b), c_fc (w, b), mlp.c_proj (w, b); ln_f (w, b); the LM head's weight.
  // `packs`: the products' weights in `pack`'s layout, in the same order (4 a block, then the LM
  // head's), for fp32 steps of more than one row; empty when only one-row steps are wanted.
  // `scales`: empty for fp32 weights; for a model in weight-only int8 (chatforge/accel/quantize.py),
  // where wte and the products' weights are int8 (out, in), their per-row fp32 scales: wte's, 4 a
  // block, the LM head's. Its products run kernels_int8.cpp's tiles for any number of rows (no packs).
  std::vector<torch::Tensor> w, packs, scales;
  int64_t n_layer, n_head, C, V;
  float eps;

  static constexpr int kPerBlock = 12;
  static constexpr int kProducts[4] = {2, 4, 8, 10};  // c_attn, attn.c_proj, c_fc, mlp.c_proj in a block

  DecodeStep(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> packed, int64_t heads, double layer_norm_eps,
             std::vector<torch::Tensor> int8_scales)
      : w(std::move(weights)), packs(std::move(packed)), scales(std::move(int8_scales)), n_head(heads),
        eps(float(layer_norm_eps)) {
    TORCH_CHECK(w.size() >= 5 && (w.size() - 5) % kPerBlock == 0,
                "chatforge_cpu::DecodeStep: expected 5 + 12 weights a block, got ", w.size());
    n_layer = (w.size() - 5) / kPerBlock;
    C = w[0].size(1);
    V = w.back().size(0);
    TORCH_CHECK(heads > 0 && C % heads == 0, "chatforge_cpu::DecodeStep: width ", C, " is not divisible by ", heads, " heads");
    TORCH_CHECK(scales.empty() || int64_t(scales.size()) == 4 * n_layer + 2,
                "chatforge_cpu::DecodeStep: expected no int8 scales or 4 a block and wte's and the LM head's, got ",
                scales.size());
    TORCH_CHECK(scales.empty() || packs.empty(), "chatforge_cpu::DecodeStep: int8 weights take no packs");
    for (size_t i = 0; i < w.size(); ++i) {
      const int64_t scale = scale_index(i);
      const auto dtype = scale >= 0 ? torch::kChar : torch::kFloat;
      TORCH_CHECK(w[i].device().is_cpu() && w[i].dtype() == dtype && w[i].is_contiguous() && w[i].dim() <= 2,
                  "chatforge_cpu::DecodeStep: weight ", i, " must be a contiguous ", scale >= 0 ? "int8" : "fp32",
                  " CPU tensor");
      if (scale >= 0)
        TORCH_CHECK(scales[scale].dtype() == torch::kFloat && scales[scale].is_contiguous() &&
                        scales[scale].numel() == w[i].size(0),
                    "chatforge_cpu::DecodeStep: scale ", scale, " must be ", w[i].size(0), " contiguous fp32 values");
    }
    TORCH_CHECK(packs.empty() || int64_t(packs.size()) == 4 * n_layer + 1,
                "chatforge_cpu::DecodeStep: expected 4 packs a block and the LM head's, got ", packs.size());
    for (size_t i = 0; i < packs.size(); ++i) {
      const torch::Tensor& weight = i + 1 == packs.size() ? w.back() : block(i / 4, kProducts[i % 4]);
      const int64_t O = weight.size(0), K = weight.size(1);
      TORCH_CHECK(packs[i].dtype() == torch::kFloat && packs[i].is_contiguous() && packs[i].dim() == 3 &&
                      packs[i].size(0) == (O + kPanel - 1) / kPanel && packs[i].size(1) == K && packs[i].size(2) == kPanel,
                  "chatforge_cpu::DecodeStep: pack ", i, " is not its weight's packed layout");
    }
  }

  const torch::Tensor& block(int64_t layer, int i) const { return w[2 + kPerBlock * layer + i]; }

  // The index in `scales` of weight i's scales (wte, the products, the LM head), or -1 where weight i
  // is fp32: every weight of an fp32 step, the rest of an int8 one.
  int64_t scale_index(size_t i) const {
    if (scales.empty()) return -1;
    if (i == 0) return 0;
    if (i + 1 == w.size()) return 4 * n_layer + 1;
    if (i < 2 || i >= 2 + size_t(kPerBlock * n_layer)) return -1;
    const int64_t in_block = (i - 2) % kPerBlock;
    for (int p = 0; p < 4; ++p)
      if (kProducts[p] == in_block) return 1 + 4 * int64_t((i - 2) / kPerBlock) + p;
    return -1;
  }

  // y [R, O] from x [R, K] through the weight w[index] (pack[pack_index] for several rows) and its bias
  void product(int64_t index, int64_t pack_index, const torch::Tensor* bias, const float* x, float* y, int64_t R,
               Then then, float* scratch, float* xt) const {
    const torch::Tensor& weight = w[index];
    const int64_t O = weight.size(0), K = weight.size(1);
    const float* b = bias ? bias->data_ptr<float>() : nullptr;
    float* out = then == Then::Add ? scratch : y;
    auto finish = [&](int64_t begin, int64_t end) {  // columns [begin, end) of every row
      for (int64_t r = 0; r < R; ++r) {
        if (then == Then::Add)
          for (int64_t o = begin; o < end; ++o) y[r * O + o] += out[r * O + o];
        else if (then == Then::Gelu)
          gelu_tanh(out + r * O + begin, end - begin);
      }
    };
    if (!scales.empty()) {
      const int8_t* Q = weight.data_ptr<int8_t>();
      const float* S = scales[pack_index + 1].data_ptr<float>();
      const int64_t ob = chatforge_int8::tile_outputs(R), tiles = (O + ob - 1) / ob;
      at::parallel_for(0, tiles, chatforge_int8::grain(K, R), [&](int64_t begin, int64_t end) {
        chatforge_int8::product_range(Q, x, S, b, out, K, O, R, begin * ob, std::min(end * ob, O));
        finish(begin * ob, std::min(end * ob, O));
      });
      return;
    }
    if (R == 1) {
      const float* W = weight.data_ptr<float>();
      at::parallel_for(0, O, 256, [&](int64_t begin, int64_t end) {
        gemv_rows(W, x, b, out, K, begin, end);
        finish(begin, end);
      });
      return;
    }
    const float* P = packs[pack_index].data_ptr<float>();
    transpose(x, R, K, xt);
    at::parallel_for(0, packs[pack_index].size(0), 1, [&](int64_t begin, int64_t end) {
      panel_range(P, xt, b, out, K, O, R, begin, end);
      finish(begin * kPanel, std::min(end * kPanel, O));
    });
  }

  // Row r's new key and value go to slot positions[r] of cache row r; its query attends over slots
  // 0..positions[r]. qkv [R, 3C] -> y [R, C]; scores: R x heads x (longest context) floats.
  void attention(int64_t layer, const std::vector<int64_t>& positions, const torch::Tensor& k_cache,
                 const torch::Tensor& v_cache, const float* qkv, float* y, float* scores, int64_t S_max) const {
    const int64_t D = C / n_head, L = k_cache.size(3), rows = k_cache.size(1), R = positions.size();
    const float scale = 1.0f / std::sqrt(float(D));
    float* K = k_cache.data_ptr<float>() + layer * rows * n_head * L * D;
    float* Vc = v_cache.data_ptr<float>() + layer * rows * n_head * L * D;
    at::parallel_for(0, R * n_head, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / n_head, hd = task % n_head, S = positions[r] + 1;
        float* kh = K + (r * n_head + hd) * L * D;
        float* vh = Vc + (r * n_head + hd) * L * D;
        const float* q = qkv + r * 3 * C + hd * D;
        std::memcpy(kh + positions[r] * D, q + C, D * sizeof(float));
        std::memcpy(vh + positions[r] * D, q + 2 * C, D * sizeof(float));
        float* s = scores + task * S_max;
        float top = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          s[j] = dot(q, kh + j * D, D) * scale;
          top = std::max(top, s[j]);
        }
        float total = 0;
        for (int64_t j = 0; j < S; j += Vec::W) {
          const auto m = chunk_mask(j, S);
          const Reg e = Vec::keep(m, vexp(Vec::sub(Vec::load(m, s + j), Vec::set1(top))));
          Vec::store(m, s + j, e);
          total += Vec::sum(e);
        }
        float* out = y + r * C + hd * D;
        std::fill(out, out + D, 0.0f);
        for (int64_t j = 0; j < S; ++j) axpy(out, s[j] / total, vh + j * D, D);
      }
    });
  }

  void layer_norms(const float* x, int64_t wi, float* h, int64_t R) const {
    const float* g = w[wi].data_ptr<float>();
    const float* b = w[wi + 1].data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) layer_norm(x + r * C, g, b, h + r * C, C, eps);
  }

  void check(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions, const torch::Tensor& k_cache,
             const torch::Tensor& v_cache) const {
    const int64_t R = tokens.size();
    TORCH_CHECK(R >= 1 && int64_t(positions.size()) == R, "chatforge_cpu::DecodeStep: ", R, " tokens and ",
                positions.size(), " positions");
    TORCH_CHECK(R == 1 || !packs.empty() || !scales.empty(), "chatforge_cpu::DecodeStep: ", R,
                " rows need the packed weights");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                    v_cache.is_contiguous() && k_cache.dtype() == torch::kFloat && v_cache.dtype() == torch::kFloat &&
                    k_cache.size(0) == n_layer && k_cache.size(1) >= R && k_cache.size(2) == n_head &&
                    k_cache.size(4) == C / n_head,
                "chatforge_cpu::DecodeStep: the caches must be contiguous fp32 [layers, rows >= ", R, ", heads, length, ",
                C / n_head, "]");
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(0 <= tokens[r] && tokens[r] < w[0].size(0), "chatforge_cpu::DecodeStep: token ", tokens[r],
                  " is outside the vocabulary");
      TORCH_CHECK(0 <= positions[r] && positions[r] < std::min(w[1].size(0), k_cache.size(3)),
                  "chatforge_cpu::DecodeStep: position ", positions[r], " is outside the context");
    }
  }

  // logits [R, V] for tokens[r] at positions[r] of cache row r (r = 0..R-1)
  torch::Tensor forward(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                        const torch::Tensor& k_cache, const torch::Tensor& v_cache) const {
    check(tokens, positions, k_cache, v_cache);
    const int64_t R = tokens.size();
    const int64_t S_max = *std::max_element(positions.begin(), positions.end()) + 1;
    // x: the residual stream; h: a LayerNorm's output, then attention's; scratch: a product before it
    // joins x; hidden: the MLP's; scores: each (row, head)'s attention weights
    auto buffer = torch::empty({R * 14 * C + R * n_head * S_max}, w[1].options());
    float* x = buffer.data_ptr<float>();
    float* h = x + R * C;
    float* qkv = h + R * C;
    float* hidden = qkv + R * 3 * C;
    float* scratch = hidden + R * 4 * C;
    float* xt = scratch + R * C;  // a product's x transposed, for several rows
    float* scores = xt + R * 4 * C;
    for (int64_t r = 0; r < R; ++r) {
      const float* pe = w[1].data_ptr<float>() + positions[r] * C;
      if (scales.empty()) {
        const float* te = w[0].data_ptr<float>() + tokens[r] * C;
        for (int64_t i = 0; i < C; ++i) x[r * C + i] = te[i] + pe[i];
      } else {  // the token's int8 row, dequantized as Int8Embedding does
        const int8_t* q = w[0].data_ptr<int8_t>() + tokens[r] * C;
        const float s = scales[0].data_ptr<float>()[tokens[r]];
        for (int64_t i = 0; i < C; ++i) x[r * C + i] = float(q[i]) * s + pe[i];
      }
    }
    for (int64_t l = 0; l < n_layer; ++l) {
      const int64_t wi = 2 + kPerBlock * l, pi = 4 * l;
      layer_norms(x, wi, h, R);
      product(wi + 2, pi, &w[wi + 3], h, qkv, R, Then::Store, nullptr, xt);
      attention(l, positions, k_cache, v_cache, qkv, h, scores, S_max);
      product(wi + 4, pi + 1, &w[wi + 5], h, x, R, Then::Add, scratch, xt);
      layer_norms(x, wi + 6, h, R);
      product(wi + 8, pi + 2, &w[wi + 9], h, hidden, R, Then::Gelu, nullptr, xt);
      product(wi + 10, pi + 3, &w[wi + 11], hidden, x, R, Then::Add, scratch, xt);
    }
    const int64_t fi = 2 + kPerBlock * n_layer;
    layer_norms(x, fi, h, R);
    auto logits = torch::empty({R, V}, w[1].options());
    product(fi + 2, 4 * n_layer, nullptr, h, logits.data_ptr<float>(), R, Then::Store, nullptr, xt);
    return logits;
  }
};
}  // namespace

TORCH_LIBRARY(chatforge_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pack(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int outputs, Tensor? bias) -> Tensor");
  m.def("panel_width", &panel_width);  // the pack's columns a panel: 16 in both builds
  m.def("isa", &isa);                  // which build this is: "avx512" or "avx2"
  m.def("gemv_prefetch", &gemv_prefetch);  // set whether the one-row product prefetches; returns what it was
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, int64_t, double,
                       std::vector<torch::Tensor>>())
      .def("forward", &DecodeStep::forward);
}
TORCH_LIBRARY_IMPL(chatforge_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack", &pack);
  m.impl("packed_linear", &packed_linear);
}
