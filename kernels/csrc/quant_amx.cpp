// y = x @ W.T for bf16 activations and GGUF weights on AMX tiles (Intel AMX-BF16), each weight block
// dequantized to bf16 in L1 just before its tile product: the bytes streamed from memory are the
// quantized ones, and the products run at AMX speed. Where AMX is, this takes the decode batches of
// 8-64 rows that the VNNI kernels (quant_linear.cpp) are compute-bound on and that a dense bf16 copy
// would take from memory at 2 bytes a weight (a 64-row step of the default model: ~270 MB against ~90).
//
// Numerics: the weight's bf16 values are exactly the dense copy's (quant_dequantize.cpp's fma, rounded
// to nearest even), products accumulate in float32 on the tiles along K in one fixed order, so a
// token's result does not depend on the other rows of its batch.
//
// Layout: C (16 weight rows x 16 tokens, float32) += A (16 weight rows x 32 K, bf16) * B (16 tokens x
// 32 K as 16 rows of K pairs: each row holds one K pair of every token, AMX's VNNI layout, made once a
// call). Per 16 weight rows, block by block along K: the rows' block is dequantized into one of two
// L1 slots, then its tile products run (up to four token tiles, 64 rows, share each A tile), while the
// next 16 rows' bytes are prefetched. C is transposed back to [token, weight row] on the way out.
// Compiled into the AVX-512 quant extension with per-function targets; called only after
// `quant_amx_available()`. Default model, its 121 linears, 2 threads, Xeon with AMX: 14 ms at 64 rows
// against 22 on oneDNN's dense bf16 copy and 93 on the VNNI kernel; 8.4 ms at 5-16 rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "quant_formats.h"
#include "quant_kernels.h"

#define KVQ_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

namespace kvq {
namespace {

constexpr int kTile = 16;       // rows of a tile (weight rows, tokens or K pairs)
constexpr int kTileK = 32;      // bf16 values of K per tile product
constexpr int kTokenTiles = 4;  // C tiles held at once: up to 64 tokens per pass over a panel

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (float32 accumulators), 4: A (weight), 5: B (tokens); all 16 rows of 64 bytes.
KVQ_AMX inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// 16 x 16 32-bit transpose in registers (unpack, then 128-bit lane shuffles).
KVQ_AMX inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// The activations as B tiles: tile (kb, mt) row r = the K pair (2r, 2r + 1) of slice kb of tokens
// 16 mt .. 16 mt + 15 (zeros past M). 1 KB a tile, tiles in (kb, mt) order.
KVQ_AMX void pack_tokens(const c10::BFloat16* x, int64_t M, int64_t K, int64_t token_tiles, uint32_t* out) {
  const int64_t pairs = K / 2;
  for (int64_t kb = 0; kb < K / kTileK; ++kb) {
    for (int64_t mt = 0; mt < token_tiles; ++mt) {
      __m512 r[16];
      for (int m = 0; m < kTile; ++m) {
        const int64_t token = mt * kTile + m;
        r[m] = token < M ? _mm512_castsi512_ps(_mm512_loadu_si512(
                               reinterpret_cast<const uint32_t*>(x) + token * pairs + kb * kTile))
                         : _mm512_setzero_ps();
      }
      transpose16(r);
      float* tile = reinterpret_cast<float*>(out + (kb * token_tiles + mt) * kTile * kTile);
      for (int i = 0; i < kTile; ++i) _mm512_store_ps(tile + i * kTile, r[i]);
    }
  }
}

// One storage block's groups as F::groups gives them (a plain functor: inlined into the AMX-targeted
// caller, where a lambda would not be).
struct BlockGroups {
  __m256i q[8];
  float scale[8][2], offset[8][2];
  int count = 0;
  inline void operator()(int g, __m256i v, float s_lo, float s_hi, float o_lo, float o_hi) {
    q[g] = v;
    scale[g][0] = s_lo;
    scale[g][1] = s_hi;
    offset[g][0] = o_lo;
    offset[g][1] = o_hi;
    count = g + 1;
  }
};

// Quant levels of a format whose groups have one scale and offset (0: convert every value instead).
template <class F> constexpr int kLevels = 0;
template <> constexpr int kLevels<Q4_0> = 16;
template <> constexpr int kLevels<Q4_1> = 16;
template <> constexpr int kLevels<Q4_K> = 16;
template <> constexpr int kLevels<Q5_K> = 32;

// One storage block of one row -> bf16 values at dst.
template <class F>
KVQ_AMX inline void dequantize_block(const uint8_t* p, c10::BFloat16* dst) {
  BlockGroups groups;
  F::groups(p, groups);
  for (int g = 0; g < groups.count; ++g, dst += kGroup) {
    if constexpr (kLevels<F> > 0) {
      // Few quant levels (a scale and an offset for the whole group): round each level's value once
      // and look the 32 values up (vpermw), instead of converting every value.
      const __m512 scale = _mm512_set1_ps(groups.scale[g][0]), offset = _mm512_set1_ps(groups.offset[g][0]);
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512 low = _mm512_fmadd_ps(iota, scale, offset);
      const __m512 high = kLevels<F> > 16 ? _mm512_fmadd_ps(_mm512_add_ps(iota, _mm512_set1_ps(16.f)), scale, offset) : low;
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(high, low);
      _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(groups.q[g]), table));
      continue;
    }
    const __m128i halves[2] = {_mm256_castsi256_si128(groups.q[g]), _mm256_extracti128_si256(groups.q[g], 1)};
    for (int h = 0; h < 2; ++h) {
      const __m512i v = F::kSigned ? _mm512_cvtepi8_epi32(halves[h]) : _mm512_cvtepu8_epi32(halves[h]);
      const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(groups.scale[g][h]),
                                       _mm512_set1_ps(groups.offset[g][h]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * h), (__m256i)_mm512_cvtneps_pbh(f));
    }
  }
}

// C tiles 0 .. group - 1 = rows n0 .. n0 + rows - 1 of the weight times token tiles mt0 .. mt0 + group - 1,
// stored to c. Block by block: the 16 rows' block is dequantized into one of two ring slots (L1), then
// its tile products run, so the stores stay in L1 and one block's dequantization overlaps the last
// one's products; the next panel's weight bytes are prefetched along the way (read once a step).
template <class F>
KVQ_AMX void multiply_panel(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t rows,
                            const uint32_t* tokens, int64_t token_tiles, int64_t mt0, int64_t group,
                            c10::BFloat16* ring, float (*c)[kTile * kTile]) {
  constexpr int64_t kSlices = F::kValues / kTileK, kSlot = kTile * F::kValues;
  const int64_t blocks = K / F::kValues;
  const uint8_t* next = w + (n0 + kTile) * row_bytes;
  const int64_t ahead = (kTile * row_bytes / blocks + 63) & ~int64_t(63);  // bytes prefetched a block
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    c10::BFloat16* slot = ring + (blk & 1) * kSlot;
    for (int64_t i = 0; i < kTile; ++i) {
      if (i < rows)
        dequantize_block<F>(w + (n0 + i) * row_bytes + blk * F::kBytes, slot + i * F::kValues);
      else
        std::memset(static_cast<void*>(slot + i * F::kValues), 0, F::kValues * sizeof(c10::BFloat16));
    }
    for (int64_t b = 0; b < ahead; b += 64) _mm_prefetch(reinterpret_cast<const char*>(next + blk * ahead + b), _MM_HINT_T0);
    for (int64_t g = 0; g < kSlices; ++g) {
      _tile_loadd(4, slot + g * kTileK, F::kValues * sizeof(c10::BFloat16));
      const uint32_t* b = tokens + ((blk * kSlices + g) * token_tiles + mt0) * kTile * kTile;
      // Tile numbers are immediates: one product per token tile held.
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (group > 1) {
        _tile_loadd(5, b + kTile * kTile, 64);
        _tile_dpbf16ps(1, 4, 5);
      }
      if (group > 2) {
        _tile_loadd(5, b + 2 * kTile * kTile, 64);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (group > 3) {
        _tile_loadd(5, b + 3 * kTile * kTile, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
  }
  _tile_stored(0, c[0], 64);
  if (group > 1) _tile_stored(1, c[1], 64);
  if (group > 2) _tile_stored(2, c[2], 64);
  if (group > 3) _tile_stored(3, c[3], 64);
}

using PanelFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t,
                         int64_t, c10::BFloat16*, float (*)[kTile * kTile]);

PanelFn panel_fn(int64_t qtype) {
  switch (qtype) {
    case kQ8_0: return multiply_panel<Q8_0>;
    case kQ4_0: return multiply_panel<Q4_0>;
    case kQ4_1: return multiply_panel<Q4_1>;
    case kQ4_K: return multiply_panel<Q4_K>;
    case kQ5_K: return multiply_panel<Q5_K>;
    case kQ6_K: return multiply_panel<Q6_K>;
  }
  return nullptr;
}

// C tiles -> y[token, n0 .. n0 + rows) (+ bias), bf16.
KVQ_AMX void store_outputs(const float* c, int64_t tokens, int64_t rows, const float* bias, c10::BFloat16* y,
                           int64_t ldy) {
  __m512 r[16];
  for (int i = 0; i < kTile; ++i) r[i] = _mm512_load_ps(c + i * kTile);
  transpose16(r);  // r[token] = its 16 outputs
  const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int64_t m = 0; m < tokens; ++m) {
    const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(r[m], b));
    _mm256_mask_storeu_epi16(y + m * ldy, mask, out);
  }
}

struct Segment {
  const uint8_t* w;
  int64_t row_bytes, rows, n_offset;
  PanelFn panel;
};

KVQ_AMX void run_tiles(const std::vector<Segment>& segments, const std::vector<std::pair<int, int64_t>>& work,
                       int64_t begin, int64_t end, const uint32_t* tokens_packed, int64_t M, int64_t K,
                       int64_t token_tiles, const float* bias, c10::BFloat16* y, int64_t N) {
  configure_tiles();
  alignas(64) c10::BFloat16 ring[2 * kTile * 256];  // two slots of 16 rows x the largest block (256 values)
  alignas(64) float c[kTokenTiles][kTile * kTile];
  for (int64_t idx = begin; idx < end; ++idx) {
    const auto [s, n0] = work[idx];
    const Segment& seg = segments[s];
    const int64_t rows = std::min<int64_t>(kTile, seg.rows - n0);
    for (int64_t mt0 = 0; mt0 < token_tiles; mt0 += kTokenTiles) {
      const int64_t group = std::min<int64_t>(kTokenTiles, token_tiles - mt0);
      seg.panel(seg.w, seg.row_bytes, K, n0, rows, tokens_packed, token_tiles, mt0, group, ring, c);
      const int64_t n = seg.n_offset + n0;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t m0 = (mt0 + g) * kTile;
        store_outputs(c[g], std::min<int64_t>(kTile, M - m0), rows, bias ? bias + n : nullptr, y + m0 * N + n, N);
      }
    }
  }
  _tile_release();
}

}  // namespace
}  // namespace kvq

bool quant_amx_available() {
  // Linux hands out the AMX tile state only to processes that ask for it (arch_prctl
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); oneDNN asks too, the answer is per process.
  static const bool ok = [] {
    if (!__builtin_cpu_supports("avx512bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

at::Tensor quant_linear_amx(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                            const std::vector<int64_t>& qtypes, const at::Tensor& bias) {
  TORCH_CHECK(quant_amx_available(), "quant_linear_amx: this CPU or kernel gives no AMX-BF16 tiles");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "quant_linear_amx: x must be a contiguous bfloat16 [tokens, in_features] matrix");
  TORCH_CHECK(!weights.empty() && weights.size() == qtypes.size(), "quant_linear_amx: one ggml type per weight");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kvq::kTileK == 0, "quant_linear_amx: in_features must be a multiple of 32");
  std::vector<kvq::Segment> segments;
  std::vector<std::pair<int, int64_t>> work;  // (segment, first row) of each 16-row panel
  int64_t N = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    kvq::check_weight(weights[i], qtypes[i], K, "quant_linear_amx");
    const int64_t rows = weights[i].size(0);
    segments.push_back({weights[i].data_ptr<uint8_t>(), weights[i].size(1), rows, N, kvq::panel_fn(qtypes[i])});
    for (int64_t n0 = 0; n0 < rows; n0 += kvq::kTile) work.emplace_back(static_cast<int>(i), n0);
    N += rows;
  }
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == N),
              "quant_linear_amx: bias must be float32 [out_features]");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const int64_t token_tiles = (M + kvq::kTile - 1) / kvq::kTile;
  auto packed = at::empty({K / kvq::kTileK * token_tiles * kvq::kTile * kvq::kTile + 16}, x.options().dtype(at::kInt));
  uint32_t* tokens_packed = reinterpret_cast<uint32_t*>(
      (reinterpret_cast<uintptr_t>(packed.data_ptr<int32_t>()) + 63) & ~uintptr_t(63));
  kvq::pack_tokens(x.data_ptr<c10::BFloat16>(), M, K, token_tiles, tokens_packed);
  const float* b = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    kvq::run_tiles(segments, work, begin, end, tokens_packed, M, K, token_tiles, b, yp, N);
  });
  return y;
}
