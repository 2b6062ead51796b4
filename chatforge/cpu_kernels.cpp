// chatforge's fp32 CPU products for decode: one row (gemv) and several rows (a panel-packed gemm),
// both prefetching the weight stream 4 KB ahead of the loads. Built on the user's machine by
// chatforge/cpu_kernels.py (torch.utils.cpp_extension) where the CPU has AVX-512; measured against
// MKL, the kernel torch calls, in chatforge/cpu_kernels.py's docstring.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {
// How far ahead of the loads the weight stream is prefetched: 4 KB (2, 4, 8 and 16 KB measured;
// 4-8 KB best, 6-7% faster than none for GPT-2 small's 49 one-row products).
constexpr int64_t kAhead = 1024;

inline __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1); }

// One row: a single sequential stream per thread, four accumulators to hide the FMA latency.
void gemv_rows(const float* W, const float* X, const float* B, float* Y, int64_t K, int64_t begin, int64_t end) {
  const int64_t K64 = K & ~int64_t(63);
  const __mmask16 tail = tail_mask(K & 15);
  for (int64_t o = begin; o < end; ++o) {
    const float* w = W + o * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K64; k += 64) {
      const char* ahead = (const char*)(w + k + kAhead);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      _mm_prefetch(ahead + 128, _MM_HINT_T0);
      _mm_prefetch(ahead + 192, _MM_HINT_T0);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(X + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(X + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(X + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(X + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(X + k), a0);
    if (tail) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + k), _mm512_maskz_loadu_ps(tail, X + k), a1);
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    Y[o] = B ? s + B[o] : s;
  }
}


constexpr int64_t kPanel = 32;  // output columns per packed panel: two AVX-512 vectors

// W [O, K] -> panels of kPanel columns, each [K][kPanel] (zero-padded past O): the layout in
// which one k step of a tile reads two whole vectors.
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

// R rows of x times one panel: 2R accumulators; x broadcast one element at a time.
template <int R>
void panel_tile(const float* P, const float* X, const float* B, float* Y, int64_t K, int64_t O, int64_t o,
                int64_t m, bool prefetch) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const float* x = X + m * K;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = P + k * kPanel;
    if (prefetch) {
      _mm_prefetch((const char*)(w + kAhead), _MM_HINT_T0);
      _mm_prefetch((const char*)(w + kAhead + 16), _MM_HINT_T0);
    }
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  const int64_t cols = std::min<int64_t>(kPanel, O - o);
  const __mmask16 m0 = tail_mask(std::min<int64_t>(16, cols)), m1 = tail_mask(std::max<int64_t>(0, cols - 16));
  const __m512 b0 = B ? _mm512_maskz_loadu_ps(m0, B + o) : _mm512_setzero_ps();
  const __m512 b1 = B ? _mm512_maskz_loadu_ps(m1, B + o + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(Y + (m + r) * O + o, m0, _mm512_add_ps(acc[r][0], b0));
    _mm512_mask_storeu_ps(Y + (m + r) * O + o + 16, m1, _mm512_add_ps(acc[r][1], b1));
  }
}

template <int R>
void panel_rest(const float* P, const float* X, const float* B, float* Y, int64_t K, int64_t O, int64_t o, int64_t m,
                int64_t rows, bool first) {
  if constexpr (R > 0) {
    if (rows == R) return panel_tile<R>(P, X, B, Y, K, O, o, m, first);
    panel_rest<R - 1>(P, X, B, Y, K, O, o, m, rows, first);
  }
}

// rows per tile: 2 x 12 accumulators, two weight vectors and the broadcast fill 27 of the 32
// registers (8 and 14 measured slower at 16 rows: 8 reads the panel twice, 14 leaves a 2-row tail)
constexpr int kTileRows = 12;

void panel_rows(const float* P, const float* X, const float* B, float* Y, int64_t K, int64_t O, int64_t M, int64_t o) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) panel_tile<kTileRows>(P, X, B, Y, K, O, o, m, m == 0);
  if (m < M) panel_rest<kTileRows - 1>(P, X, B, Y, K, O, o, m, M - m, m == 0);
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
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) panel_rows(P + p * K * kPanel, t.X, t.B, t.Y, K, O, M, p * kPanel);
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
}  // namespace

TORCH_LIBRARY(chatforge_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pack(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int outputs, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(chatforge_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack", &pack);
  m.impl("packed_linear", &packed_linear);
}
