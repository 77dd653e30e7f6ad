// kvferry's kernels for GGUF weights kept in their block formats (kernels/quant.py). Each is defined in
// the quant_*.cpp file of its name; quant_formats.h holds the block layouts.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace kvq {
// Refuses (TORCH_CHECK) a weight that is not uint8 [rows, row_bytes] of `qtype` blocks over K values.
void check_weight(const at::Tensor& w, int64_t qtype, int64_t K, const char* who);
}  // namespace kvq

// y = x @ cat(W_i).T (+ bias): x [M, K] float32 or bfloat16; weights[i] uint8 [N_i, row_bytes] of ggml type
// qtypes[i]; bias float32 [sum N_i] or empty. Returns [M, sum N_i] in x's dtype.
at::Tensor quant_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& qtypes,
                        const at::Tensor& bias);

// uint8 [N, row_bytes] of ggml type qtype -> [N, in_features] float32 or bfloat16 (a new tensor, or out).
at::Tensor quant_dequantize(const at::Tensor& w, int64_t qtype, int64_t in_features, at::ScalarType dtype);
void quant_dequantize_into(const at::Tensor& w, int64_t qtype, const at::Tensor& out);

// The same product on AMX-BF16 tiles (quant_amx.cpp; AVX-512 build only): x bfloat16 [M, K], K a multiple
// of 32; the weight dequantized to bfloat16 block by block (the dense copy's values). Returns bfloat16.
bool quant_amx_available();
at::Tensor quant_linear_amx(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                            const std::vector<int64_t>& qtypes, const at::Tensor& bias);
