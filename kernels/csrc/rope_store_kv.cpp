// RoPE on q and k and the store of k and v into the paged cache, in one pass over a qkv product.
//
// The CPU decode step otherwise spends a dozen small tensor ops per layer here (roll, products,
// sum, two index_copy_). Roundings are those of the model's bf16 expression
// ``x * cos + roll(x, D / 2) * sin_signed``: each product rounded to bf16, then their sum.
#include "cpu_kernels.h"

namespace {

inline float bf(at::BFloat16 v) { return static_cast<float>(v); }
inline float round_bf16(float v) { return static_cast<float>(static_cast<at::BFloat16>(v)); }

// x rotated by the position's cos/sin (sin carries the sign of rotate_half in its first half).
inline void rotate(const at::BFloat16* x, const at::BFloat16* cos, const at::BFloat16* sin, int64_t D,
                   at::BFloat16* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float rolled = bf(x[(d + half) % D]);
    out[d] = static_cast<at::BFloat16>(round_bf16(bf(x[d]) * bf(cos[d])) + round_bf16(rolled * bf(sin[d])));
  }
}

}  // namespace

at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kBFloat16, "rope_store_kv: qkv");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.scalar_type() == at::kBFloat16,
              "rope_store_kv: kv_cache");
  const int64_t T = qkv.size(0), D = kv_cache.size(4), H = num_heads, KVH = num_kv_heads;
  TORCH_CHECK(qkv.size(1) == (H + 2 * KVH) * D && kv_cache.size(3) == KVH && D % 2 == 0, "rope_store_kv: shapes ",
              qkv.sizes(), " ", kv_cache.sizes());
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "rope_store_kv: cos/sin [T, D] bf16");
  TORCH_CHECK(slot_mapping.numel() == T && slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "rope_store_kv: slot_mapping [T] int64");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2), row = KVH * D;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rope_store_kv: slot ", slots[t], " out of range");
  auto q = at::empty({T, H, D}, qkv.options());
  const at::BFloat16* src = qkv.data_ptr<at::BFloat16>();
  at::BFloat16* k_cache = kv_cache.data_ptr<at::BFloat16>();
  at::BFloat16* v_cache = k_cache + num_slots * row;
  for (int64_t t = 0; t < T; ++t) {
    const at::BFloat16* x = src + t * (H + 2 * KVH) * D;
    const at::BFloat16* c = cos.data_ptr<at::BFloat16>() + t * D;
    const at::BFloat16* s = sin.data_ptr<at::BFloat16>() + t * D;
    for (int64_t h = 0; h < H; ++h) rotate(x + h * D, c, s, D, q.data_ptr<at::BFloat16>() + (t * H + h) * D);
    for (int64_t h = 0; h < KVH; ++h) rotate(x + (H + h) * D, c, s, D, k_cache + slots[t] * row + h * D);
    std::copy(x + (H + KVH) * D, x + (H + 2 * KVH) * D, v_cache + slots[t] * row);
  }
  return q;
}
