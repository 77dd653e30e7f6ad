// The SIMD layer of kvferry's CPU kernels: one vector of fp32 lanes, for the ISA this translation unit
// is compiled for (kernels/cpu_kernels.py builds the same sources twice: -mavx512f... and -mavx2 -mfma).
//
// Kernels are written once against it, templated on the storage type (float or at::BFloat16):
// ``load`` widens to fp32 (bf16 -> fp32 is exact: a 16-bit shift), ``store`` narrows with torch's
// rounding (round to nearest even, NaN -> 0x7FC0, as c10::BFloat16(float)), so a kernel that rounds
// where the torch expression rounds gives its bits. Sources are compiled with -ffp-contract=off: the
// compiler must not fuse a multiply and an add that the torch expression rounds separately.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvf {

using bf16 = at::BFloat16;

#if defined(__AVX512F__)

constexpr int64_t kLanes = 16;
using vf = __m512;
using vi = __m512i;

inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float v) { return _mm512_set1_ps(v); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf floor(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline float reduce_add(vf v) { return _mm512_reduce_add_ps(v); }
// The sums of four vectors at once, sharing one shuffle tree (~a third of four reduce_adds' work):
// 128-bit quarters first, then the four lanes of each; out[i] = sum of v_i's lanes.
inline void reduce_add4(vf a, vf b, vf c, vf d, float* out) {
  const vf ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const vf cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  vf x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));  // a b c d
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));  // each quarter: lanes (0+2, 1+3, ...)
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));  // lane 0 of each quarter: its sum
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, x);
  out[0] = lanes[0], out[1] = lanes[4], out[2] = lanes[8], out[3] = lanes[12];
}

inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf load(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vi bf16_bits(vf v) {  // the rounded bf16 of each lane, in the low half of a 32-bit lane
  const vi u = _mm512_castps_si512(v);
  const vi bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                   _mm512_set1_epi32(0x7FFF));
  const vi rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
}
inline void store(bf16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}
inline vf round_bf16(vf v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
// 2 * kLanes bf16 as two fp32 vectors, the even-indexed elements and the odd ones: two plain integer
// ops, no shuffle (the skinny linear pairs them with x laid out the same way).
inline void load_pairs(const bf16* p, vf& even, vf& odd) {
  const vi raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline vi cvt_floor_to_int(vf v) { return _mm512_cvttps_epi32(v); }  // v is integral already
inline vf pow2_of_int(vi n) {  // 2^n for n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
}
inline vf mul_pow2(vf p, vi n) {  // p * 2^n, n in [-252, 254]: two factors, each within one exponent field
  const vi half = _mm512_srai_epi32(n, 1);
  return mul(mul(p, pow2_of_int(half)), pow2_of_int(_mm512_sub_epi32(n, half)));
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int64_t kLanes = 8;
using vf = __m256;
using vi = __m256i;

inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float v) { return _mm256_set1_ps(v); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf floor(vf a) { return _mm256_floor_ps(a); }
inline float reduce_add(vf v) {  // a fixed tree: (lanes 0-3 + 4-7), then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// The sums of four vectors at once, sharing one shuffle tree; out[i] = sum of v_i's lanes.
inline void reduce_add4(vf a, vf b, vf c, vf d, float* out) {
  const vf abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128-bit half: a b c d
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf load(const bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vi bf16_bits(vf v) {
  const vi u = _mm256_castps_si256(v);
  const vi bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                   _mm256_set1_epi32(0x7FFF));
  const vi rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const vi nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}
inline void store(bf16* p, vf v) {
  const vi bits = bf16_bits(v);  // 0..0xFFFF per lane: packus_epi32 keeps them as they are
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline vf round_bf16(vf v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
inline void load_pairs(const bf16* p, vf& even, vf& odd) {
  const vi raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline vi cvt_floor_to_int(vf v) { return _mm256_cvttps_epi32(v); }
inline vf pow2_of_int(vi n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
inline vf mul_pow2(vf p, vi n) {
  const vi half = _mm256_srai_epi32(n, 1);
  return mul(mul(p, pow2_of_int(half)), pow2_of_int(_mm256_sub_epi32(n, half)));
}

#else
#error "kvferry's CPU kernels need AVX2 and FMA, or AVX-512"
#endif

// The value as stored in T: fp32 unchanged, bf16 rounded (the rounding of an intermediate the torch
// expression materialises in the model dtype).
template <typename T>
inline vf round_as(vf v);
template <>
inline vf round_as<float>(vf v) { return v; }
template <>
inline vf round_as<bf16>(vf v) { return round_bf16(v); }

template <typename T>
inline float round_as(float v) { return static_cast<float>(static_cast<T>(v)); }

// Up to kLanes elements of a row's tail, zero-filled (a kernel that reads or writes a partial vector).
template <typename T>
inline vf load_partial(const T* p, int64_t n) {
  T buf[kLanes] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return load(buf);
}
template <typename T>
inline void store_partial(T* p, vf v, int64_t n) {
  T buf[kLanes];
  store(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

// exp(x) in fp32, within ~2 ulp of the exact value (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
// a degree-6 polynomial in r, then the scaling by 2^n). Overflows to inf past ~88.72 and underflows
// through the denormals to 0 below ~-103.3, as torch's exp does (inputs are clamped to [-104, 89],
// which changes no result).
inline vf exp(vf x) {
  x = vmin(vmax(x, set1(-104.0f)), set1(89.0f));
  const vf n = floor(fma(x, set1(1.44269504088896341f), set1(0.5f)));
  vf r = fma(n, set1(-0.693359375f), x);  // ln2 in two parts: n times the first is exact in fp32
  r = fma(n, set1(2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, set1(1.0f)));
  return mul_pow2(p, cvt_floor_to_int(n));
}

}  // namespace kvf
