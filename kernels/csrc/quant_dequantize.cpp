// GGUF block rows -> float32 or bfloat16 rows (quant_formats.h's groups, 8 values per FMA). Used for
// prompt-sized products (the weight dequantized into a reused buffer, then oneDNN/MKL: a fresh
// allocation of a few MB per call cost more in page faults than the dequantization) and for the
// embedding rows a step looks up.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "quant_formats.h"
#include "quant_kernels.h"

namespace kvq {
namespace {

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {  // round to nearest even, as torch's float -> bfloat16
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  // NaN stays NaN (the rounding add could carry it into infinity)
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), _mm256_castps_si256(nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <class F, class T>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t K, T* out, int64_t n0, int64_t n1) {
  const int64_t num_blocks = K / F::kValues;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    T* y = out + n * K;
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      F::groups(row + blk * F::kBytes, [&](int g, __m256i q, float s_lo, float s_hi, float o_lo, float o_hi) {
        T* dst = y + blk * F::kValues + g * kGroup;
        const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
        for (int h = 0; h < 2; ++h) {
          const __m256 scale = _mm256_set1_ps(h ? s_hi : s_lo), offset = _mm256_set1_ps(h ? o_hi : o_lo);
          const __m128i b = halves[h];
          const __m256i lo = F::kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
          const __m128i b8 = _mm_srli_si128(b, 8);
          const __m256i hi = F::kSigned ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
          store8(dst + 16 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), scale, offset));
          store8(dst + 16 * h + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), scale, offset));
        }
      });
    }
  }
}

template <class T>
void dispatch(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t K, T* out, int64_t n0, int64_t n1) {
  switch (qtype) {
    case kQ8_0: return dequantize_rows<Q8_0, T>(w, row_bytes, K, out, n0, n1);
    case kQ4_0: return dequantize_rows<Q4_0, T>(w, row_bytes, K, out, n0, n1);
    case kQ4_1: return dequantize_rows<Q4_1, T>(w, row_bytes, K, out, n0, n1);
    case kQ4_K: return dequantize_rows<Q4_K, T>(w, row_bytes, K, out, n0, n1);
    case kQ5_K: return dequantize_rows<Q5_K, T>(w, row_bytes, K, out, n0, n1);
    case kQ6_K: return dequantize_rows<Q6_K, T>(w, row_bytes, K, out, n0, n1);
  }
}

}  // namespace
}  // namespace kvq

void quant_dequantize_into(const at::Tensor& w, int64_t qtype, const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == w.size(0), "quant_dequantize: out must be a "
              "contiguous [rows, in_features] matrix with the weight's rows");
  const int64_t in_features = out.size(1);
  const at::ScalarType dtype = out.scalar_type();
  kvq::check_weight(w, qtype, in_features, "quant_dequantize");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "quant_dequantize: float32 or bfloat16 output only");
  const int64_t N = w.size(0), row_bytes = w.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // ~16 KB of output per task
  const int64_t grain = std::max<int64_t>(1, 4096 / in_features);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    if (dtype == at::kFloat)
      kvq::dispatch<float>(qtype, wp, row_bytes, in_features, out.data_ptr<float>(), begin, end);
    else
      kvq::dispatch<c10::BFloat16>(qtype, wp, row_bytes, in_features, out.data_ptr<c10::BFloat16>(), begin, end);
  });
}

at::Tensor quant_dequantize(const at::Tensor& w, int64_t qtype, int64_t in_features, at::ScalarType dtype) {
  auto out = at::empty({w.size(0), in_features}, w.options().dtype(dtype));
  quant_dequantize_into(w, qtype, out);
  return out;
}
