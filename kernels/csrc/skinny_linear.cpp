// Skinny matrix products for any ISA of vec.h: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]) for 1-8 rows
// of x, with W in fp32 or bf16 and fp32 accumulation (bf16 x bf16 on AVX512-BF16 goes to
// skinny_linear_dpbf16.cpp instead).
//
// At decode a linear is a read of W: every weight is used once per token, so the kernel streams W
// row by row in its own [N, K] layout (no packed copy), with software prefetch (skinny_linear.h). x
// is widened to fp32 once per call. A bf16 weight is widened in registers with two integer ops and no
// shuffle: a vector of 2 * kLanes bf16 read as kLanes 32-bit words gives the even-indexed weights by
// a left shift and the odd ones by a mask, and x is laid out in the same even/odd order.
//
// Every (m, n) output is accumulated in the same order whatever M is (vector lanes, a fixed tree,
// then the K % chunk tail in order, then the bias), so a token's result does not depend on its batch.
#include "cpu_kernels.h"

#include <vector>

#include "skinny_linear.h"
#include "vec.h"

namespace {

using namespace kvf;

template <typename WT>
constexpr int64_t kChunk = std::is_same_v<WT, bf16> ? 2 * kLanes : kLanes;  // weights per step

// x [M, K] widened to fp32, each chunk of a bf16 weight's width as [even elements | odd elements].
template <typename WT, typename XT>
std::vector<float> widen_x(const XT* x, int64_t M, int64_t K) {
  std::vector<float> xs(M * K);
  const int64_t full = K / kChunk<WT> * kChunk<WT>;
  for (int64_t m = 0; m < M; ++m) {
    const XT* xr = x + m * K;
    float* out = xs.data() + m * K;
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(xr[k]);
      if (std::is_same_v<WT, bf16> && k < full) {
        const int64_t base = k / kChunk<WT> * kChunk<WT>, i = k - base;
        out[base + (i % 2) * kLanes + i / 2] = v;
      } else {
        out[k] = v;
      }
    }
  }
  return xs;
}

inline void fma_chunk(const float* w, const float* x, vf& acc) { acc = fma(load(w), load(x), acc); }
inline void fma_chunk(const bf16* w, const float* x, vf& acc) {
  vf even, odd;
  load_pairs(w, even, odd);
  acc = fma(even, load(x), acc);
  acc = fma(odd, load(x + kLanes), acc);
}

// ROWS rows of W against M rows of x, for rows [n0, n1) (n1 - n0 a multiple of ROWS, or the tail).
template <typename WT, typename YT, int M, int ROWS>
void gemv_rows(const float* xs, const WT* w, const float* bias, YT* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t full = K / kChunk<WT> * kChunk<WT>;
  prefetch_start(reinterpret_cast<const char*>(w + n0 * K), reinterpret_cast<const char*>(w + n1 * K));
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    vf acc[M][ROWS];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) acc[m][r] = zero();
    const WT* wr = w + n * K;
    for (int64_t k = 0; k < full; k += kChunk<WT>) {
      for (int r = 0; r < ROWS; ++r) {
        const char* at = reinterpret_cast<const char*>(wr + r * K + k);
        _mm_prefetch(at + kPrefetchNear, _MM_HINT_T0);
        _mm_prefetch(at + kPrefetchFar, _MM_HINT_T1);
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < ROWS; ++r) fma_chunk(wr + r * K + k, xs + m * K + k, acc[m][r]);
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) {
        float s = reduce_add(acc[m][r]);
        for (int64_t k = full; k < K; ++k) s += static_cast<float>(wr[r * K + k]) * xs[m * K + k];
        if (bias) s += bias[n + r];
        y[m * N + n + r] = static_cast<YT>(s);
      }
  }
  if (n < n1) gemv_rows<WT, YT, M, 1>(xs, w, bias, y, K, N, n, n1);
}

template <typename WT, typename YT, int M>
void gemv(const float* xs, const WT* w, const float* bias, YT* y, int64_t K, int64_t N, const char* next,
          int64_t next_bytes) {
  constexpr int ROWS = M == 1 ? 4 : (M == 2 ? 2 : 1);
  split_rows<ROWS>(N, K * sizeof(WT), next, next_bytes,
                   [&](int64_t n0, int64_t n1) { gemv_rows<WT, YT, M, ROWS>(xs, w, bias, y, K, N, n0, n1); });
}

template <typename XT, typename WT>
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const float* bias, const char* next, int64_t next_bytes) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const std::vector<float> xs = widen_x<WT>(x.data_ptr<XT>(), M, K);
  const WT* wp = w.data_ptr<WT>();
  XT* yp = y.data_ptr<XT>();
  switch (M) {
    case 1: gemv<WT, XT, 1>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    case 2: gemv<WT, XT, 2>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    case 3: gemv<WT, XT, 3>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    case 4: gemv<WT, XT, 4>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    case 5: gemv<WT, XT, 5>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    case 6: gemv<WT, XT, 6>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    case 7: gemv<WT, XT, 7>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
    default: gemv<WT, XT, 8>(xs.data(), wp, bias, yp, K, N, next, next_bytes); break;
  }
  return y;
}

}  // namespace

// x [M, K], w [N, K], bias fp32 [N] or empty; returns [M, N] in x's dtype. 1 <= M <= 8. (x, w): (bf16,
// bf16), (fp32, bf16) or (fp32, fp32). next: the weight the caller's next linear reads (any dtype), or
// empty.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& next) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: shapes ", x.sizes(), " ", w.sizes());
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK((xt == at::kBFloat16 && wt == at::kBFloat16) || (xt == at::kFloat && wt == at::kBFloat16) ||
                  (xt == at::kFloat && wt == at::kFloat),
              "skinny_linear: (x, w) dtypes must be (bf16, bf16), (fp32, bf16) or (fp32, fp32), got ", xt, " ", wt);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous tensors only");
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == w.size(0)),
              "skinny_linear: bias must be fp32 [N]");
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "skinny_linear: 1 <= M <= 8, got ", M);
  const float* bp = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  const bool has_next = next.defined() && next.numel() > 0 && next.is_contiguous();
  const char* np = has_next ? static_cast<const char*>(next.data_ptr()) : nullptr;
  const int64_t nb = has_next ? next.numel() * next.element_size() : 0;
  if (xt == at::kBFloat16) {
#if defined(__AVX512BF16__)
    return skinny_linear_dpbf16(x, w, bp, np, nb);
#else
    return run<bf16, bf16>(x, w, bp, np, nb);
#endif
  }
  return wt == at::kBFloat16 ? run<float, bf16>(x, w, bp, np, nb) : run<float, float>(x, w, bp, np, nb);
}
