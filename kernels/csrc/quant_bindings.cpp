// Python bindings of the quantized-weight kernels. Every kernel releases the GIL: a worker's gRPC
// threads run while the engine thread is inside one.
#include <torch/extension.h>

#include "quant_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
#if defined(__AVX512VNNI__)
  m.attr("isa") = "avx512_vnni";
  m.def("quant_amx_available", &quant_amx_available, "whether this CPU and kernel give this process AMX-BF16 tiles");
  m.def("quant_linear_amx", &quant_linear_amx, "y = x @ W.T (+ bias) on AMX tiles, W in GGUF blocks, x bfloat16", nogil());
#else
  m.attr("isa") = "avx2";
#endif
  m.def("quant_linear", &quant_linear, "y = x @ W.T (+ bias), W in GGUF blocks, x quantized to Q8 blocks", nogil());
  m.def("quant_dequantize", &quant_dequantize, "GGUF block rows -> float32 or bfloat16 rows", nogil());
  m.def("quant_dequantize_into", &quant_dequantize_into, "GGUF block rows -> rows of out (float32 or bfloat16)", nogil());
}
