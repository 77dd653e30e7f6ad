// The gated MLP's activation, silu(gate) * up, from the fused gate/up product in one pass, with the
// roundings of the model's bf16 expression ``F.silu(gate) * up`` (silu rounded to bf16, then the
// product). silu's exp may differ from torch's vectorized one in the last fp32 bit, which the bf16
// rounding almost always hides.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.scalar_type() == at::kBFloat16 &&
                  gate_up.size(1) % 2 == 0,
              "silu_mul: contiguous bf16 [T, 2 * intermediate]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  const at::BFloat16* src = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, T, std::max<int64_t>(1, 32768 / I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const at::BFloat16* g = src + t * 2 * I;
      const at::BFloat16* u = g + I;
      for (int64_t i = 0; i < I; ++i) {
        const float x = static_cast<float>(g[i]);
        const float silu = static_cast<float>(static_cast<at::BFloat16>(x / (1.0f + std::exp(-x))));
        dst[t * I + i] = static_cast<at::BFloat16>(silu * static_cast<float>(u[i]));
      }
    }
  });
  return out;
}
