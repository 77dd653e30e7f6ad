// kvferry's CPU kernels. The same sources build one extension per ISA (kernels/cpu_kernels.py): AVX-512
// with AVX512-BF16, and AVX2 + FMA; vec.h holds what differs. Each kernel is defined in the .cpp
// file of its name and takes fp32 or bf16 tensors (one dtype per call, checked).
#pragma once

#include <ATen/ATen.h>

// y = x @ w.T (+ bias) for 1-8 rows of x; (x, w) dtypes (bf16, bf16), (fp32, bf16) or (fp32, fp32);
// w [N, K]; bias fp32 [N] or empty; next: the weight read next (prefetched as this call ends), or
// empty. y has x's dtype.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& next);

// One query token per request over its paged K/V. query [B, H, D]; kv_cache [2, num_blocks,
// block_size, KVH, D] of query's dtype; block_tables [B, max_blocks] int32; context_lens [B] int32.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale);

// (norm(x + residual) * weight, x + residual), with Hugging Face Llama's roundings; rows of x's dtype.
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual);

// q rotated [T, H, D]; k rotated and v stored at slot_mapping. qkv [T, (H + 2 KVH) D]; cos, sin
// [T, D] of qkv's dtype (the model's duplicated halves, sin signed for rotate_half).
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads);

// silu(gate) * up from gate_up [T, 2 I] (gate first); [T, I] of its dtype.
at::Tensor silu_mul(const at::Tensor& gate_up);
