// Python bindings of the CPU kernels (the only file that includes the heavy torch/extension.h).
// Every kernel releases the GIL: a worker's gRPC threads (streaming tokens, receiving KV) run
// while the engine thread is inside one.
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
#if defined(__AVX512F__)
  m.attr("isa") = "avx512";
#else
  m.attr("isa") = "avx2";
#endif
  m.def("skinny_linear", &skinny_linear, "y = x @ w.T (+ bias) for 1-8 rows, fp32 accumulation", nogil());
  m.def("decode_attention", &decode_attention, "paged decode attention, one query token per request", nogil());
  m.def("rope_store_kv", &rope_store_kv, "RoPE on q and k, k and v stored into the paged cache", nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up from the fused gate/up product", nogil());
  m.def("rms_norm", &rms_norm, "RMSNorm with the residual add fused, Hugging Face Llama numerics", nogil());
}
