// Python bindings of the CPU kernels (the only file that includes the heavy torch/extension.h).
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "y = x @ w.T (+ bias) for 1-8 bf16 rows (AVX512-BF16)");
  m.def("decode_attention", &decode_attention, "paged decode attention, one query token per request");
  m.def("rope_store_kv", &rope_store_kv, "RoPE on q and k, k and v stored into the paged cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from the fused gate/up product");
  m.def("rms_norm", &rms_norm, "RMSNorm with the residual add fused, Hugging Face Llama numerics");
}
