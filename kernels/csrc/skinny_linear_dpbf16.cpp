// Skinny bf16 x bf16 matrix products on x86 CPUs with AVX512-BF16: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]).
// Compiled into the AVX-512 extension only; skinny_linear.cpp's entry calls it for bf16 x and W.
//
// For the few-token case (decode at batch 1..8) the product is a read of W: every weight byte is
// used once per token, so the goal is to stream W at memory bandwidth. oneDNN's packed bf16 path
// reads it at roughly half the bandwidth here (see docs/PERFORMANCE.md); this kernel walks W row
// by row, in its natural [N, K] layout (no second, packed copy), with one vdpbf16ps per 32 weights
// per token and fp32 accumulation, splitting the rows between torch's intra-op threads.
//
// Every (m, n) output is accumulated in the same order whatever M is, so a token's result does not
// depend on the batch it came in.
#include "skinny_linear.h"

namespace {

constexpr int64_t kLanes = 32;  // bf16 values per 512-bit register

inline __m512bh load_bf16(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  return c10::BFloat16(f).x;
}

// ROWS rows of W against M rows of x, for rows [n0, n1) (n1 - n0 a multiple of ROWS, or the tail).
template <int M, int ROWS>
void gemv_rows(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  const int64_t full = K / kLanes * kLanes;
  const __mmask32 tail_mask = (__mmask32)((1ull << (K - full)) - 1);
  int64_t n = n0;
  kvf::prefetch_start(reinterpret_cast<const char*>(w + n0 * K), reinterpret_cast<const char*>(w + n1 * K));
  for (; n + ROWS <= n1; n += ROWS) {
    __m512 acc[M][ROWS];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_setzero_ps();
    const uint16_t* wr = w + n * K;
    for (int64_t k = 0; k < K; k += kLanes) {
      const __mmask32 mask = k < full ? (__mmask32)0xFFFFFFFF : tail_mask;
      __m512bh wv[ROWS];
      for (int r = 0; r < ROWS; ++r) {
        wv[r] = load_bf16(wr + r * K + k, mask);
        const char* at = reinterpret_cast<const char*>(wr + r * K + k);
        _mm_prefetch(at + kvf::kPrefetchNear, _MM_HINT_T0);
        _mm_prefetch(at + kvf::kPrefetchFar, _MM_HINT_T1);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = load_bf16(x + m * K + k, mask);
        for (int r = 0; r < ROWS; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < ROWS; ++r) {
        float s = _mm512_reduce_add_ps(acc[m][r]);
        if (bias) s += bias[n + r];
        y[m * N + n + r] = to_bf16(s);
      }
  }
  if (n < n1) gemv_rows<M, 1>(x, w, bias, y, K, N, n, n1);
}

template <int M>
void gemv(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y, int64_t K, int64_t N,
          const char* next, int64_t next_bytes) {
  constexpr int ROWS = M == 1 ? 4 : (M == 2 ? 2 : 1);
  kvf::split_rows<ROWS>(N, 2 * K, next, next_bytes,
                        [&](int64_t n0, int64_t n1) { gemv_rows<M, ROWS>(x, w, bias, y, K, N, n0, n1); });
}

}  // namespace

at::Tensor skinny_linear_dpbf16(const at::Tensor& x, const at::Tensor& w, const float* bias, const char* next,
                                int64_t next_bytes) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  switch (M) {
    case 1: gemv<1>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    case 2: gemv<2>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    case 3: gemv<3>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    case 4: gemv<4>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    case 5: gemv<5>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    case 6: gemv<6>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    case 7: gemv<7>(xp, wp, bias, yp, K, N, next, next_bytes); break;
    default: gemv<8>(xp, wp, bias, yp, K, N, next, next_bytes); break;
  }
  return y;
}
