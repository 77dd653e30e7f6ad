// What the skinny linears share (skinny_linear.cpp, any ISA; skinny_linear_dpbf16.cpp, AVX512-BF16):
// the software prefetch that keeps the weight stream at memory bandwidth, and the split of W's rows
// between torch's threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace kvf {

// Software prefetch distances, in bytes ahead of the loads: to L1 near, to L2 far. The hardware
// prefetcher alone read the small matrices of a decoder layer at ~15 GB/s on a Zen 4; with these,
// ~24 (2 threads; the distances were picked by measuring 8-128 KB there).
constexpr int64_t kPrefetchNear = 16 * 1024;
constexpr int64_t kPrefetchFar = 64 * 1024;

// The first kPrefetchNear bytes of [start, end) asked for at once, as a row loop's own prefetches ask
// for what lies that far ahead of its loads.
inline void prefetch_start(const char* start, const char* end) {
  for (const char* p = start; p < start + kPrefetchNear && p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
}

// The start of each thread's share of the weight the next call will read, asked for into L2 as this
// call ends: it arrives while Python runs the ops between the two linears, instead of the next call
// starting on a cold stream.
inline void prefetch_next(const char* next, int64_t next_bytes, bool whole_range) {
  if (next == nullptr || next_bytes == 0) return;
  const int64_t threads = at::get_num_threads(), share = next_bytes / threads;
  for (int64_t t = 0; t < threads; ++t) {
    if (!whole_range && t != at::get_thread_num()) continue;
    const char* start = next + t * share;
    for (int64_t i = 0; i < std::min(share, kPrefetchFar); i += 64) _mm_prefetch(start + i, _MM_HINT_T1);
  }
}

// rows(n0, n1) over W's N rows in tasks of whole ROWS-row tiles (the last task takes the leftover
// rows), about 64 KB of weights per task so that small matrices stay on one thread; then the next
// weight's prefetch.
template <int ROWS, typename Rows>
void split_rows(int64_t N, int64_t row_bytes, const char* next, int64_t next_bytes, const Rows& rows) {
  const int64_t grain = std::max<int64_t>(ROWS, (65536 / row_bytes) / ROWS * ROWS);
  if (N < ROWS) {
    rows(0, N);
    return prefetch_next(next, next_bytes, true);
  }
  at::parallel_for(0, N / ROWS, grain / ROWS, [&](int64_t begin, int64_t end) {
    const int64_t n1 = end * ROWS == N / ROWS * ROWS ? N : end * ROWS;
    rows(begin * ROWS, n1);
    prefetch_next(next, next_bytes, begin == 0 && end == N / ROWS);
  });
}

}  // namespace kvf

// bf16 x [M, K] times bf16 W [N, K] with vdpbf16ps (skinny_linear_dpbf16.cpp); bias fp32 [N] or null.
at::Tensor skinny_linear_dpbf16(const at::Tensor& x, const at::Tensor& w, const float* bias, const char* next,
                                int64_t next_bytes);
