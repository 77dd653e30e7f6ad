// GGUF block formats (ggml's Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) unpacked into 32-value groups, and the
// Q8 activation blocks the dot products run against, for x86 with AVX2 + FMA + F16C.
//
// Each format's `groups(block, fn)` calls fn(g, q, scale_lo, scale_hi, offset_lo, offset_hi) for each
// 32-value group g of one storage block: q holds the 32 quants as bytes (unsigned, except Q8_0's signed
// ones) in value order, and value[i] = q[i] * scale + offset, with the _lo pair for values 0-15 and the
// _hi pair for 16-31 (they differ only in Q6_K, whose scales cover 16 values). The layouts are ggml's
// (ggml-quants.c dequantize_row_*); gguf.quants.dequantize is the reference the tests hold them to.
//
// The file is compiled twice (kernels/quant.py): for AVX2, and for AVX-512 with VNNI, where the
// unsigned-by-signed byte dot is one vpdpbusd instead of vpmaddubsw + vpmaddwd. Both builds work on
// 256-bit vectors: one vector is one 32-value group, and Zen 4 runs 512-bit ops as two 256-bit halves.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace kvq {

constexpr int64_t kGroup = 32;  // values per group, and per Q8 activation block

// ggml type ids (gguf.GGMLQuantizationType)
enum QType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// sum over 4-byte groups of u[i] * s[i] (u unsigned, s signed bytes): 8 int32 lanes, lane j holding
// values 4j..4j+3. Never saturates for |u| <= 127 or u <= 63 (maddubs sums two products in int16).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// 16 bytes of packed nibbles -> 32 bytes: low nibbles (values 0-15) then high nibbles (16-31).
inline __m256i nibbles16(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_insertf128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high4(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

// 6-bit scale and min j (0..7) of a Q4_K/Q5_K block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& d, int& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

struct Q8_0 {  // d (fp16), 32 x int8
  static constexpr int64_t kValues = 32, kBytes = 34;
  static constexpr bool kSigned = true, kSplit = false;
  template <class Fn>
  static inline void groups(const uint8_t* p, Fn&& fn) {
    const float d = fp16(p);
    fn(0, load32(p + 2), d, d, 0.f, 0.f);
  }
};

struct Q4_0 {  // d (fp16), 16 bytes of nibbles; value = (q - 8) * d
  static constexpr int64_t kValues = 32, kBytes = 18;
  static constexpr bool kSigned = false, kSplit = false;
  template <class Fn>
  static inline void groups(const uint8_t* p, Fn&& fn) {
    const float d = fp16(p);
    fn(0, nibbles16(p + 2), d, d, -8.f * d, -8.f * d);
  }
};

struct Q4_1 {  // d, m (fp16), 16 bytes of nibbles; value = q * d + m
  static constexpr int64_t kValues = 32, kBytes = 20;
  static constexpr bool kSigned = false, kSplit = false;
  template <class Fn>
  static inline void groups(const uint8_t* p, Fn&& fn) {
    int32_t dm;  // d and m converted together
    std::memcpy(&dm, p, 4);
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
    const float d = _mm_cvtss_f32(f), m = _mm_cvtss_f32(_mm_movehdup_ps(f));
    fn(0, nibbles16(p + 4), d, d, m, m);
  }
};

struct Q4_K {  // d, dmin (fp16), scales[12] (8 x 6-bit scale + min), qs[128]; value = d*sc*q - dmin*m
  static constexpr int64_t kValues = 256, kBytes = 144;
  static constexpr bool kSigned = false, kSplit = false;
  template <class Fn>
  static inline void groups(const uint8_t* p, Fn&& fn) {
    const float d = fp16(p), dmin = fp16(p + 2);
    const uint8_t* scales = p + 4;
    const uint8_t* qs = p + 16;
    for (int j = 0; j < 4; ++j) {  // 64 values: low nibbles of 32 bytes, then their high nibbles
      const __m256i v = load32(qs + 32 * j);
      int sc, m;
      scale_min_k4(2 * j, scales, sc, m);
      fn(2 * j, low4(v), d * sc, d * sc, -dmin * m, -dmin * m);
      scale_min_k4(2 * j + 1, scales, sc, m);
      fn(2 * j + 1, high4(v), d * sc, d * sc, -dmin * m, -dmin * m);
    }
  }
};

struct Q5_K {  // d, dmin, scales[12], qh[32] (bit g of byte l: the fifth bit of value l of group g), qs[128]
  static constexpr int64_t kValues = 256, kBytes = 176;
  static constexpr bool kSigned = false, kSplit = false;
  static inline __m256i high_bit(__m256i qh, int g) {  // 16 where group g's fifth bit is set
    const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << g));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(16));
  }
  template <class Fn>
  static inline void groups(const uint8_t* p, Fn&& fn) {
    const float d = fp16(p), dmin = fp16(p + 2);
    const uint8_t* scales = p + 4;
    const __m256i qh = load32(p + 16);
    const uint8_t* qs = p + 48;
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(qs + 32 * j);
      int sc, m;
      scale_min_k4(2 * j, scales, sc, m);
      fn(2 * j, _mm256_or_si256(low4(v), high_bit(qh, 2 * j)), d * sc, d * sc, -dmin * m, -dmin * m);
      scale_min_k4(2 * j + 1, scales, sc, m);
      fn(2 * j + 1, _mm256_or_si256(high4(v), high_bit(qh, 2 * j + 1)), d * sc, d * sc, -dmin * m, -dmin * m);
    }
  }
};

struct Q6_K {  // ql[128], qh[64], scales[16] (int8, one per 16 values), d (fp16); value = d*sc*(q - 32)
  static constexpr int64_t kValues = 256, kBytes = 210;
  static constexpr bool kSigned = false, kSplit = true;
  template <class Fn>
  static inline void groups(const uint8_t* p, Fn&& fn) {
    const float d = fp16(p + 208);
    const auto* scales = reinterpret_cast<const int8_t*>(p + 192);
    const __m256i three = _mm256_set1_epi8(3);
    for (int n = 0; n < 2; ++n) {  // two halves of 128 values
      const uint8_t* ql = p + 64 * n;
      const __m256i qh = load32(p + 128 + 32 * n);
      const __m256i l0 = load32(ql), l1 = load32(ql + 32);
      const int8_t* sc = scales + 8 * n;
      const __m256i hi[4] = {  // bits 2k, 2k+1 of qh, as 16 * (0..3)
          _mm256_slli_epi16(_mm256_and_si256(qh, three), 4),
          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4),
          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4),
          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4)};
      const __m256i q[4] = {_mm256_or_si256(low4(l0), hi[0]), _mm256_or_si256(low4(l1), hi[1]),
                            _mm256_or_si256(high4(l0), hi[2]), _mm256_or_si256(high4(l1), hi[3])};
      for (int k = 0; k < 4; ++k) {
        const float s0 = d * sc[2 * k], s1 = d * sc[2 * k + 1];
        fn(4 * n + k, q[k], s0, s1, -32.f * s0, -32.f * s1);
      }
    }
  }
};

// A row of activations quantized to Q8 blocks of 32 (llama.cpp's Q8_0/Q8_1 scheme: d = max|x| / 127,
// q = round(x * 127 / max|x|)), with the sums that offset formats multiply their offsets by.
struct QRow {
  const int8_t* q;       // [K]
  const float* d;        // [K / 32]
  const float* sum;      // [K / 32]: d * (sum of the block's q)
  const float* sum_half; // [K / 16]: d * (sum of q over values 16h..16h+15)
};

}  // namespace kvq
