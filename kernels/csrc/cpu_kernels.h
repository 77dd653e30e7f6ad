// kvferry's CPU kernels (x86 with AVX512-BF16; the whole extension is built for it, see
// kernels/cpu_kernels.py). Each is defined in the .cpp file of its name.
#pragma once

#include <ATen/ATen.h>

// y = x @ w.T (+ bias) for 1-8 bf16 rows of x; w [N, K] bf16, bias fp32 [N] or empty; next: the
// weight read next (prefetched as this call ends), or empty.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& next);

// One query token per request over its paged K/V. query [B, H, D] bf16; kv_cache [2, num_blocks,
// block_size, KVH, D] bf16; block_tables [B, max_blocks] int32; context_lens [B] int32.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale);

// (norm(x + residual) * weight, x + residual), with Hugging Face Llama's roundings; bf16 rows.
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual);

// q rotated [T, H, D]; k rotated and v stored at slot_mapping. qkv [T, (H + 2 KVH) D] bf16;
// cos, sin [T, D] bf16 (the model's duplicated halves, sin signed for rotate_half).
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads);

// silu(gate) * up from gate_up [T, 2 I] bf16 (gate first); [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up);
