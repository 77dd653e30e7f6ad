// Skinny bf16 matrix products on x86 CPUs with AVX512-BF16: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]).
//
// For the few-token case (decode at batch 1..8) the product is a read of W: every weight byte is
// used once per token, so the goal is to stream W at memory bandwidth. oneDNN's packed bf16 path
// reads it at roughly half the bandwidth here (see docs/PERFORMANCE.md); this kernel walks W row
// by row, in its natural [N, K] layout (no second, packed copy), with one vdpbf16ps per 32 weights
// per token and fp32 accumulation, splitting the rows between torch's intra-op threads.
//
// Every (m, n) output is accumulated in the same order whatever M is, so a token's result does not
// depend on the batch it came in.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kLanes = 32;  // bf16 values per 512-bit register
// Software prefetch distances, in bytes ahead of the loads: to L1 near, to L2 far. The hardware
// prefetcher alone read the small matrices of a decoder layer at ~15 GB/s here; with these, ~24
// (2 threads; the distances were picked by measuring 8-128 KB on this machine).
constexpr int64_t kPrefetchNear = 16 * 1024;
constexpr int64_t kPrefetchFar = 64 * 1024;

inline __m512bh load_bf16(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  return c10::BFloat16(f).x;
}

// ROWS rows of W against M rows of x, for rows [n0, n1) (n1 - n0 a multiple of ROWS, or the tail).
template <int M, int ROWS>
void gemv_rows(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y,
                          int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t full = K / kLanes * kLanes;
  const __mmask32 tail_mask = (__mmask32)((1ull << (K - full)) - 1);
  int64_t n = n0;
  // Start the stream: the first kPrefetchNear bytes of this range are asked for at once, as the
  // prefetches in the loop below ask for what lies that far ahead of the loads.
  {
    const char* start = (const char*)(w + n0 * K);
    const char* end = (const char*)(w + n1 * K);
    for (const char* p = start; p < start + kPrefetchNear && p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
  }
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
        _mm_prefetch(at + kPrefetchNear, _MM_HINT_T0);
        _mm_prefetch(at + kPrefetchFar, _MM_HINT_T1);
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

// The start of each thread's share of the weight the next call will read, asked for into L2 as this
// call ends: it arrives while Python runs the ops between the two linears, instead of the next call
// starting on a cold stream.
void prefetch_next(const char* next, int64_t next_bytes, bool whole_range) {
  if (next == nullptr || next_bytes == 0) return;
  const int64_t threads = at::get_num_threads(), share = next_bytes / threads;
  for (int64_t t = 0; t < threads; ++t) {
    if (!whole_range && t != at::get_thread_num()) continue;
    const char* start = next + t * share;
    for (int64_t i = 0; i < std::min(share, kPrefetchFar); i += 64) _mm_prefetch(start + i, _MM_HINT_T1);
  }
}

template <int M>
void gemv(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y, int64_t K, int64_t N,
          const char* next, int64_t next_bytes) {
  constexpr int ROWS = M == 1 ? 4 : (M == 2 ? 2 : 1);
  // Grain: about 64 KB of weights per task, so small matrices stay on one thread.
  const int64_t grain = std::max<int64_t>(ROWS, (65536 / (2 * K)) / ROWS * ROWS);
  if (N < ROWS) {
    gemv_rows<M, ROWS>(x, w, bias, y, K, N, 0, N);
    return prefetch_next(next, next_bytes, true);
  }
  at::parallel_for(0, N / ROWS, grain / ROWS, [&](int64_t begin, int64_t end) {
    const int64_t n1 = end * ROWS == N / ROWS * ROWS ? N : end * ROWS;
    gemv_rows<M, ROWS>(x, w, bias, y, K, N, begin * ROWS, n1);
    prefetch_next(next, next_bytes, begin == 0 && end == N / ROWS);
  });
}

}  // namespace

// x [M, K] bf16, w [N, K] bf16, bias [N] fp32 or empty; returns [M, N] bf16. 1 <= M <= 8. next: the
// weight the caller's next linear reads (any dtype), or empty.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& next) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: shapes ", x.sizes(), " ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "skinny_linear: bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous tensors only");
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == w.size(0)),
              "skinny_linear: bias must be fp32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "skinny_linear: 1 <= M <= 8, got ", M);
  auto y = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const bool has_next = next.defined() && next.numel() > 0 && next.is_contiguous();
  const char* np = has_next ? static_cast<const char*>(next.data_ptr()) : nullptr;
  const int64_t nb = has_next ? next.numel() * next.element_size() : 0;
  switch (M) {
    case 1: gemv<1>(xp, wp, bp, yp, K, N, np, nb); break;
    case 2: gemv<2>(xp, wp, bp, yp, K, N, np, nb); break;
    case 3: gemv<3>(xp, wp, bp, yp, K, N, np, nb); break;
    case 4: gemv<4>(xp, wp, bp, yp, K, N, np, nb); break;
    case 5: gemv<5>(xp, wp, bp, yp, K, N, np, nb); break;
    case 6: gemv<6>(xp, wp, bp, yp, K, N, np, nb); break;
    case 7: gemv<7>(xp, wp, bp, yp, K, N, np, nb); break;
    default: gemv<8>(xp, wp, bp, yp, K, N, np, nb); break;
  }
  return y;
}
