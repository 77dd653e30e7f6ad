// RoPE on q and k and the store of k and v into the paged cache, in one pass over a qkv product.
//
// The CPU decode step otherwise spends a dozen small tensor ops per layer here (roll, products,
// sum, two index_copy_). Roundings are those of the model's expression
// ``x * cos + roll(x, D / 2) * sin_signed`` in its dtype: each product rounded to the model dtype,
// then their sum (no fused multiply-add), so q and k come out bit for bit as the torch expression's.
#include "cpu_kernels.h"

#include <algorithm>

#include "vec.h"

namespace {

using namespace kvf;

// x rotated by the position's cos/sin (sin carries the sign of rotate_half in its first half).
template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, int64_t D, T* out) {
  const int64_t half = D / 2;
  if (half % kLanes == 0) {
    for (int64_t d = 0; d < half; d += kLanes) {
      const vf lo = load(x + d), hi = load(x + half + d);
      store(out + d, add(round_as<T>(mul(lo, load(cos + d))), round_as<T>(mul(hi, load(sin + d)))));
      store(out + half + d,
            add(round_as<T>(mul(hi, load(cos + half + d))), round_as<T>(mul(lo, load(sin + half + d)))));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    const float rolled = static_cast<float>(x[(d + half) % D]);
    out[d] = static_cast<T>(round_as<T>(static_cast<float>(x[d]) * static_cast<float>(cos[d])) +
                            round_as<T>(rolled * static_cast<float>(sin[d])));
  }
}

template <typename T>
void run(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv_cache,
         const int64_t* slots, int64_t H, int64_t KVH, at::Tensor& q) {
  const int64_t T_ = qkv.size(0), D = kv_cache.size(4), row = KVH * D;
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const T* src = qkv.data_ptr<T>();
  T* k_cache = kv_cache.data_ptr<T>();
  T* v_cache = k_cache + num_slots * row;
  for (int64_t t = 0; t < T_; ++t) {
    const T* x = src + t * (H + 2 * KVH) * D;
    const T* c = cos.data_ptr<T>() + t * D;
    const T* s = sin.data_ptr<T>() + t * D;
    for (int64_t h = 0; h < H; ++h) rotate<T>(x + h * D, c, s, D, q.data_ptr<T>() + (t * H + h) * D);
    for (int64_t h = 0; h < KVH; ++h) rotate<T>(x + (H + h) * D, c, s, D, k_cache + slots[t] * row + h * D);
    std::copy(x + (H + KVH) * D, x + (H + 2 * KVH) * D, v_cache + slots[t] * row);
  }
}

}  // namespace

at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && (dtype == at::kBFloat16 || dtype == at::kFloat),
              "rope_store_kv: contiguous fp32 or bf16 qkv");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.scalar_type() == dtype,
              "rope_store_kv: contiguous kv_cache of qkv's dtype");
  const int64_t T = qkv.size(0), D = kv_cache.size(4), H = num_heads, KVH = num_kv_heads;
  TORCH_CHECK(qkv.size(1) == (H + 2 * KVH) * D && kv_cache.size(3) == KVH && D % 2 == 0, "rope_store_kv: shapes ",
              qkv.sizes(), " ", kv_cache.sizes());
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "rope_store_kv: cos/sin [T, D] of qkv's dtype");
  TORCH_CHECK(slot_mapping.numel() == T && slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "rope_store_kv: slot_mapping [T] int64");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rope_store_kv: slot ", slots[t], " out of range");
  auto q = at::empty({T, H, D}, qkv.options());
  if (dtype == at::kFloat)
    run<float>(qkv, cos, sin, kv_cache, slots, H, KVH, q);
  else
    run<bf16>(qkv, cos, sin, kv_cache, slots, H, KVH, q);
  return q;
}
