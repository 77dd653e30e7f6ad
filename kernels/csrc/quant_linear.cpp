// y = x @ W.T (+ b) with W kept in a GGUF block format, for the rows of a decode step (1-64 tokens).
// Two paths: streamed (the weight read once, 1-8 tokens a pass over each tile of rows while it sits in
// L1), and tiled (a tile of 4-bit rows unpacked once, then met by every token in register blocks: for
// 8+ tokens, where the multiply-adds rather than the weight read are the cost).
//
// As in llama.cpp, x is first quantized to Q8 blocks of 32 (one scale per block), then every group
// of 32 weights is a byte dot product (quant_formats.h: vpmaddubsw on AVX2, vpdpbusd with VNNI),
// scaled by the two blocks' scales in fp32. What is streamed from memory is the quantized bytes:
// 0.56-1.06 bytes a weight instead of 2 (bf16) or 4 (fp32). Rows are split across torch's intra-op
// threads; each output is summed in the same order whatever the number of tokens, so a token's
// result does not depend on the batch it came in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant_formats.h"
#include "quant_kernels.h"

namespace kvq {
namespace {

constexpr int kMaxTokens = 8;      // tokens per pass (accumulators in registers)
constexpr int64_t kTileRows = 16;  // rows per tile: each tile meets every pass of tokens while in L1
constexpr int64_t kPrefetch = 8 * 1024;  // bytes ahead of the loads that are asked for (see skinny_linear.cpp)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 -> fp32 is a shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The token rows of one call, quantized, and for the tiled path each group of kMicroTokens tokens' scales
// laid out as lane 2m + r wants them: [group of tokens][G][8] = x0 x0 x1 x1 x2 x2 x3 x3.
struct Acts {
  std::vector<QRow> rows;
  std::vector<float> patterns;
  std::vector<float> sums_t;    // [G][padded_tokens]: QRow::sum transposed, for the tiled path's offsets
  std::vector<float> scales_t;  // [G][padded_tokens]: QRow::d transposed (lanes of tokens)
  int64_t padded_tokens = 0;  // tokens rounded up to 8
};

// One row of K values -> Q8 blocks (q, d, half-block sums), as llama.cpp's quantize_row_q8_1.
template <class T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* d, float* sum, float* sum_half) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / kGroup; ++b) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(x + b * kGroup + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float max_abs = _mm_cvtss_f32(m);
    d[b] = max_abs / 127.f;
    const __m256 id = _mm256_set1_ps(max_abs != 0.f ? 127.f / max_abs : 0.f);
    __m256i n[4];
    for (int i = 0; i < 4; ++i)
      n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const int32_t s0 = hsum_i32(_mm256_add_epi32(n[0], n[1])), s1 = hsum_i32(_mm256_add_epi32(n[2], n[3]));
    sum_half[2 * b] = d[b] * static_cast<float>(s0);
    sum_half[2 * b + 1] = d[b] * static_cast<float>(s1);
    sum[b] = d[b] * static_cast<float>(s0 + s1);
    // int32 -> int8, then undo the lane interleaving of the two packs
    const __m256i p16a = _mm256_packs_epi32(n[0], n[1]), p16b = _mm256_packs_epi32(n[2], n[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kGroup), p8);
  }
}

// Formats whose offset term is one value per 32-value group (all but Q6_K, whose two halves differ).
template <class F>
constexpr bool kGroupOffsets = !F::kSplit && !F::kSigned;

// Per-thread scratch, reused from call to call (a fresh buffer per call would cost page faults).
inline float* scratch_floats(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ROWS rows of W (consecutive, row_bytes apart) against M quantized token rows, streamed once: out[m][r].
// The path for a few tokens, where reading the weight is the cost.
template <class F, int M, int ROWS>
inline void dot_rows(const uint8_t* w, int64_t row_bytes, int64_t num_blocks, const QRow* xs, const float* dt,
                     int64_t ldd, float out[][ROWS]) {
  constexpr int64_t kGroups = F::kValues / kGroup;
  const int64_t G = num_blocks * kGroups;
  __m256 acc[M][ROWS];
  float off[M][ROWS];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) {
      acc[m][r] = _mm256_setzero_ps();
      off[m][r] = 0.f;
    }
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    for (int r = 0; r < ROWS; ++r) {
      const uint8_t* p = w + r * row_bytes + blk * F::kBytes;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
      if (F::kBytes > 64) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch + 64, _MM_HINT_T0);
      if (F::kBytes > 128) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch + 128, _MM_HINT_T0);
      F::groups(p, [&](int g, __m256i q, float s_lo, float s_hi, float o_lo, float o_hi) {
        const int64_t b = blk * kGroups + g;  // activation block
        __m256i absq;
        if constexpr (F::kSigned) absq = _mm256_sign_epi8(q, q);
        // the weight's scales, shared by every token: one per lane group of 4 values
        const __m256 ws = F::kSplit ? _mm256_set_m128(_mm_set1_ps(s_hi), _mm_set1_ps(s_lo)) : _mm256_set1_ps(s_lo);
        // lane m: the scale of token m (eight tokens from one multiply; a split format needs its two)
        const __m256 sc8 = _mm256_mul_ps(_mm256_set1_ps(s_lo), _mm256_loadu_ps(dt + b * ldd));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[m].q + b * kGroup));
          const __m256i dot = F::kSigned ? dot_u8s8(absq, _mm256_sign_epi8(x, q)) : dot_u8s8(q, x);
          const __m256 scale = F::kSplit ? _mm256_mul_ps(ws, _mm256_broadcast_ss(xs[m].d + b))
                                         : _mm256_permutevar8x32_ps(sc8, _mm256_set1_epi32(m));
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[m][r]);
          if constexpr (F::kSplit)
            off[m][r] += o_lo * xs[m].sum_half[2 * b] + o_hi * xs[m].sum_half[2 * b + 1];
          else if constexpr (!F::kSigned)
            off[m][r] = std::fmaf(o_lo, xs[m].sum[b], off[m][r]);  // the order rows_tiled keeps
        }
      });
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < ROWS; ++r) out[m][r] = hsum(acc[m][r]) + off[m][r];
}

template <class T>
inline void store(T* y, float v) { *y = static_cast<T>(v); }

// Rows [n0, n1) of one weight for all M tokens (in passes of up to kMaxTokens), written to y[:, col0 + n].
template <class F, class T>
void rows_streamed(const uint8_t* w, int64_t row_bytes, int64_t K, const Acts& a, const float* bias, T* y,
                   int64_t ldy, int64_t col0, int64_t n0, int64_t n1) {
  const int64_t num_blocks = K / F::kValues;
  const int64_t M = static_cast<int64_t>(a.rows.size());
  for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
    const int64_t t1 = std::min(n1, t0 + kTileRows);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTokens) {
      const int mc = static_cast<int>(std::min<int64_t>(kMaxTokens, M - m0));
      const QRow* x = a.rows.data() + m0;
      const float* dt = a.scales_t.data() + m0;  // [G][padded_tokens]
      const int64_t ldd = a.padded_tokens;
      int64_t n = t0;
      auto emit = [&](auto out, int rows) {
        for (int m = 0; m < mc; ++m)
          for (int r = 0; r < rows; ++r)
            store(y + (m0 + m) * ldy + col0 + n + r, out[m][r] + (bias ? bias[n + r] : 0.f));
      };
#define KVQ_PASS(MC, R)                                                          \
  case MC: {                                                                     \
    constexpr int ROWS = R;                                                      \
    for (; n + ROWS <= t1; n += ROWS) {                                          \
      float out[MC][ROWS];                                                       \
      dot_rows<F, MC, ROWS>(w + n * row_bytes, row_bytes, num_blocks, x, dt, ldd, out); \
      emit(out, ROWS);                                                           \
    }                                                                            \
    for (; n < t1; ++n) {                                                        \
      float out[MC][1];                                                          \
      dot_rows<F, MC, 1>(w + n * row_bytes, row_bytes, num_blocks, x, dt, ldd, out); \
      emit(out, 1);                                                              \
    }                                                                            \
    break;                                                                       \
  }
      switch (mc) {
        KVQ_PASS(1, 4)
        KVQ_PASS(2, 2)
        KVQ_PASS(3, 2)
        KVQ_PASS(4, 1)
        KVQ_PASS(5, 1)
        KVQ_PASS(6, 1)
        KVQ_PASS(7, 1)
        default:
        KVQ_PASS(8, 1)
      }
#undef KVQ_PASS
    }
  }
}

// The tiled path, for many tokens, where the arithmetic is the cost: a tile of weight rows is unpacked
// once into bytes (and fp32 scales and offsets), then every token meets it in register blocks of
// kMicroTokens tokens x 2 rows. Each product is the streamed path's, in the same order, so a token's
// result has the same bits whichever path (and batch) computed it: the scale of a (token, row) pair is
// w_scale * x_scale rounded to fp32 (eight of them from one vector multiply), the byte dot is the same
// instruction, and the offset term is the same fma chain over the groups, here eight tokens a vector.
// It pays where the weight's unpacking is shared by many tokens and the multiply-add ports are the
// limit: the unsigned 4-bit formats (kGroupOffsets) from kTiledMinTokens tokens. Q8_0 has a sign fix
// per pair either way and gains nothing; Q6_K's two scales per group keep the streamed path.
constexpr int kMicroTokens = 4;

template <bool kSigned, int MT, int RT>
__attribute__((noinline)) void micro_tile(const uint8_t* q, const uint8_t* qsign, int64_t K, const int8_t* const* xq,
                       const float* sc, int64_t G, float out[kMicroTokens][2]) {
  __m256 acc[MT][RT];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 2
    for (int r = 0; r < RT; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i wq[RT], ws[RT];
#pragma GCC unroll 2
    for (int r = 0; r < RT; ++r) {
      wq[r] = load32(q + r * K + g * kGroup);
      if constexpr (kSigned) ws[r] = load32(qsign + r * K + g * kGroup);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + g * kGroup));
#pragma GCC unroll 2
      for (int r = 0; r < RT; ++r) {
        const __m256i dot = kSigned ? dot_u8s8(wq[r], _mm256_sign_epi8(x, ws[r])) : dot_u8s8(wq[r], x);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(sc + 8 * g + 2 * m + r), acc[m][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 2
    for (int r = 0; r < RT; ++r) out[m][r] = hsum(acc[m][r]);
}

// NR rows' offset terms (offsets [NR][G]) for every token (sums_t [G][Mp]) -> out [NR][Mp]: per (row,
// token) the streamed path's fma chain in group order; the NR rows are independent chains kept in
// registers (with a run-time count they spilled, and each fma waited on a store-to-load round trip).
template <int NR>
inline void offset_rows(const float* offsets, int64_t G, const float* sums_t, int64_t Mp, float* out) {
  for (int64_t m8 = 0; m8 < Mp; m8 += 8) {
    __m256 v[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) v[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256 t = _mm256_loadu_ps(sums_t + g * Mp + m8);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) v[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(offsets + j * G + g), t, v[j]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) _mm256_storeu_ps(out + j * Mp + m8, v[j]);
  }
}

template <class F, class T>
void rows_tiled(const uint8_t* w, int64_t row_bytes, int64_t K, const Acts& a, const float* bias, T* y,
                int64_t ldy, int64_t col0, int64_t n0, int64_t n1) {
  constexpr int64_t kGroups = F::kValues / kGroup;
  const int64_t num_blocks = K / F::kValues, G = K / kGroup;
  const int64_t M = static_cast<int64_t>(a.rows.size());
  thread_local std::vector<uint8_t> quants_buf, signs_buf;
  thread_local std::vector<float> scales_buf, offsets_buf, pattern_buf;
  if (quants_buf.size() < static_cast<size_t>(kTileRows * K)) quants_buf.resize(kTileRows * K);
  if (F::kSigned && signs_buf.size() < static_cast<size_t>(kTileRows * K)) signs_buf.resize(kTileRows * K);
  uint8_t* quants = quants_buf.data();  // [row][K]: unsigned bytes (|q| for a signed format)
  uint8_t* signs = signs_buf.data();    // [row][K]: a signed format's own quants, for the sign trick
  float* scales = scratch_floats(scales_buf, kTileRows * G);    // [row][G]
  float* offsets = scratch_floats(offsets_buf, kTileRows * G);  // [row][G]
  float* wpat = scratch_floats(pattern_buf, kTileRows * G * 8);  // [row pair][G][8]: r0 r1 r0 r1 ...
  float* sc = wpat + kTileRows / 2 * G * 8;  // [row pair][G][8]: the scales of one group of tokens
  thread_local std::vector<float> token_offsets_buf;
  float* token_offsets = scratch_floats(token_offsets_buf, kTileRows * a.padded_tokens);  // [row][token]
  for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
    const int rows = static_cast<int>(std::min(n1, t0 + kTileRows) - t0);
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = w + (t0 + r) * row_bytes;
      // the weight is read once, from memory: ask for what the tiles ahead will read
      for (int64_t at = 0; at < row_bytes; at += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row) + kPrefetch + at, _MM_HINT_T0);
      for (int64_t blk = 0; blk < num_blocks; ++blk)
        F::groups(row + blk * F::kBytes, [&](int g, __m256i q, float s_lo, float, float o_lo, float) {
          const int64_t b = blk * kGroups + g;
          if constexpr (F::kSigned) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(quants + r * K + b * kGroup), _mm256_sign_epi8(q, q));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(signs + r * K + b * kGroup), q);
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(quants + r * K + b * kGroup), q);
          }
          scales[r * G + b] = s_lo;
          offsets[r * G + b] = o_lo;
        });
    }
    for (int p = 0; p < (rows + 1) / 2; ++p) {
      const float* s0 = scales + 2 * p * G;
      const float* s1 = scales + std::min(2 * p + 1, rows - 1) * G;
      for (int64_t g = 0; g < G; ++g)
        for (int i = 0; i < 4; ++i) {
          wpat[(p * G + g) * 8 + 2 * i] = s0[g];
          wpat[(p * G + g) * 8 + 2 * i + 1] = s1[g];
        }
    }
    // each row's offset term for every token: the streamed path's fma chain, eight rows at a time
    const int64_t Mp = a.padded_tokens;
    if constexpr (kGroupOffsets<F>) {
      const float* sums = a.sums_t.data();
      int r = 0;
      for (; r + 8 <= rows; r += 8) offset_rows<8>(offsets + r * G, G, sums, Mp, token_offsets + r * Mp);
      for (; r < rows; ++r) offset_rows<1>(offsets + r * G, G, sums, Mp, token_offsets + r * Mp);
    }
    for (int64_t m0 = 0; m0 < M; m0 += kMicroTokens) {
      const int mt = static_cast<int>(std::min<int64_t>(kMicroTokens, M - m0));
      const int8_t* xq[kMicroTokens];
      for (int m = 0; m < kMicroTokens; ++m) xq[m] = a.rows[m0 + std::min(m, mt - 1)].q;
      const float* xpat = a.patterns.data() + (m0 / kMicroTokens) * G * 8;
      // lane 2m + r of group g for row pair p: the scale of token m, row 2p + r (eight from one multiply)
      for (int p = 0; p < (rows + 1) / 2; ++p)
        for (int64_t g = 0; g < G; ++g)
          _mm256_storeu_ps(sc + (p * G + g) * 8,
                           _mm256_mul_ps(_mm256_loadu_ps(wpat + (p * G + g) * 8), _mm256_loadu_ps(xpat + 8 * g)));
      for (int r0 = 0; r0 < rows; r0 += 2) {
        const int rt = std::min(2, rows - r0);
        float out[kMicroTokens][2];
        const uint8_t* q = quants + r0 * K;
        const uint8_t* s = signs + r0 * K;
        const float* scp = sc + (r0 / 2) * G * 8;
#define KVQ_MICRO(MT_, RT_) micro_tile<F::kSigned, MT_, RT_>(q, s, K, xq, scp, G, out)
        if (rt == 2) {
          switch (mt) { case 1: KVQ_MICRO(1, 2); break; case 2: KVQ_MICRO(2, 2); break;
                        case 3: KVQ_MICRO(3, 2); break; default: KVQ_MICRO(4, 2); }
        } else {
          switch (mt) { case 1: KVQ_MICRO(1, 1); break; case 2: KVQ_MICRO(2, 1); break;
                        case 3: KVQ_MICRO(3, 1); break; default: KVQ_MICRO(4, 1); }
        }
#undef KVQ_MICRO
        for (int m = 0; m < mt; ++m)
          for (int r = 0; r < rt; ++r) {
            const int64_t n = t0 + r0 + r;
            float v = out[m][r];
            v += kGroupOffsets<F> ? token_offsets[(r0 + r) * Mp + m0 + m] : 0.f;  // as hsum + off there
            store(y + (m0 + m) * ldy + col0 + n, v + (bias ? bias[n] : 0.f));
          }
      }
    }
  }
}

// From this many tokens the unsigned 4-bit formats take the tiled path (measured: about even at 4, ahead
// from 8; AMD EPYC Zen 4, AVX2 build, one thread).
constexpr int64_t kTiledMinTokens = 8;

template <class F, class T>
void rows_all_tokens(const uint8_t* w, int64_t row_bytes, int64_t K, const Acts& a, const float* bias, T* y,
                     int64_t ldy, int64_t col0, int64_t n0, int64_t n1) {
  if (kGroupOffsets<F> && static_cast<int64_t>(a.rows.size()) >= kTiledMinTokens)
    rows_tiled<F, T>(w, row_bytes, K, a, bias, y, ldy, col0, n0, n1);
  else
    rows_streamed<F, T>(w, row_bytes, K, a, bias, y, ldy, col0, n0, n1);
}

template <class T>
using RowsFn = void (*)(const uint8_t*, int64_t, int64_t, const Acts&, const float*, T*, int64_t, int64_t,
                        int64_t, int64_t);

template <class T>
RowsFn<T> rows_fn(int64_t qtype) {
  switch (qtype) {
    case kQ8_0: return rows_all_tokens<Q8_0, T>;
    case kQ4_0: return rows_all_tokens<Q4_0, T>;
    case kQ4_1: return rows_all_tokens<Q4_1, T>;
    case kQ4_K: return rows_all_tokens<Q4_K, T>;
    case kQ5_K: return rows_all_tokens<Q5_K, T>;
    case kQ6_K: return rows_all_tokens<Q6_K, T>;
    default: TORCH_CHECK(false, "quant_linear: unsupported ggml type ", qtype);
  }
}

template <class T>
at::Tensor run(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& qtypes,
               const at::Tensor& bias) {
  const int64_t M = x.size(0), K = x.size(1);
  int64_t N = 0;
  for (const auto& w : weights) N += w.size(0);
  // Each token row quantized once (the calling thread: M * K is small next to the weights).
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * (K / kGroup));
  std::vector<float> sum(M * (K / kGroup)), sum_half(M * (K / 16));
  Acts a;
  a.rows.resize(M);
  const T* xp = x.data_ptr<T>();
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(xp + m * K, K, q.data() + m * K, d.data() + m * G, sum.data() + m * G, sum_half.data() + m * 2 * G);
    a.rows[m] = QRow{q.data() + m * K, d.data() + m * G, sum.data() + m * G, sum_half.data() + m * 2 * G};
  }
  a.padded_tokens = (M + 7) / 8 * 8;
  a.scales_t.assign(G * a.padded_tokens, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) a.scales_t[g * a.padded_tokens + m] = a.rows[m].d[g];
  if (M >= kTiledMinTokens) {
    const int64_t groups = (M + kMicroTokens - 1) / kMicroTokens;
    a.patterns.assign(groups * G * 8, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float* lane = a.patterns.data() + ((m / kMicroTokens) * G + g) * 8 + 2 * (m % kMicroTokens);
        lane[0] = lane[1] = a.rows[m].d[g];
      }
    a.sums_t.assign(G * a.padded_tokens, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) a.sums_t[g * a.padded_tokens + m] = a.rows[m].sum[g];
  }
  auto y = at::empty({M, N}, x.options());
  T* yp = y.data_ptr<T>();
  const float* bp = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  int64_t col0 = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t rows = w.size(0), row_bytes = w.size(1);
    const auto fn = rows_fn<T>(qtypes[i]);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const float* bias_i = bp ? bp + col0 : nullptr;
    // About 32 KB of weights per task: small matrices stay on one thread.
    const int64_t grain = std::max<int64_t>(kTileRows, 32768 / row_bytes / kTileRows * kTileRows);
    at::parallel_for(0, (rows + kTileRows - 1) / kTileRows, std::max<int64_t>(1, grain / kTileRows),
                     [&](int64_t begin, int64_t end) {
                       fn(wp, row_bytes, K, a, bias_i, yp, N, col0, begin * kTileRows,
                          std::min(rows, end * kTileRows));
                     });
    col0 += rows;
  }
  return y;
}

int64_t block_values(int64_t qtype) {
  switch (qtype) {
    case kQ8_0: case kQ4_0: case kQ4_1: return 32;
    case kQ4_K: case kQ5_K: case kQ6_K: return 256;
    default: return 0;
  }
}

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case kQ8_0: return Q8_0::kBytes;
    case kQ4_0: return Q4_0::kBytes;
    case kQ4_1: return Q4_1::kBytes;
    case kQ4_K: return Q4_K::kBytes;
    case kQ5_K: return Q5_K::kBytes;
    case kQ6_K: return Q6_K::kBytes;
    default: return 0;
  }
}

}  // namespace

void check_weight(const at::Tensor& w, int64_t qtype, int64_t K, const char* who) {
  TORCH_CHECK(block_values(qtype) > 0, who, ": unsupported ggml type ", qtype);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), who,
              ": weight must be contiguous uint8 [rows, row_bytes]");
  TORCH_CHECK(K % block_values(qtype) == 0, who, ": in_features ", K, " is not a multiple of the block size ",
              block_values(qtype), " of ggml type ", qtype);
  TORCH_CHECK(w.size(1) == K / block_values(qtype) * block_bytes(qtype), who, ": weight has ", w.size(1),
              " bytes a row, ggml type ", qtype, " with ", K, " values needs ", K / block_values(qtype) * block_bytes(qtype));
}

}  // namespace kvq

at::Tensor quant_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& qtypes,
                        const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_linear: x must be a contiguous [tokens, in_features] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "quant_linear: x must be float32 or bfloat16");
  TORCH_CHECK(!weights.empty() && weights.size() == qtypes.size(), "quant_linear: one ggml type per weight");
  const int64_t K = x.size(1);
  int64_t N = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    kvq::check_weight(weights[i], qtypes[i], K, "quant_linear");
    N += weights[i].size(0);
  }
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == N),
              "quant_linear: bias must be float32 [out_features]");
  if (x.size(0) == 0) return at::empty({0, N}, x.options());
  return x.scalar_type() == at::kFloat ? kvq::run<float>(x, weights, qtypes, bias)
                                       : kvq::run<c10::BFloat16>(x, weights, qtypes, bias);
}
