// The gated MLP's activation, silu(gate) * up, from the fused gate/up product in one pass, with the
// roundings of the model's expression ``F.silu(gate) * up`` (silu rounded to the model dtype, then the
// product). silu is torch's ``x / (1 + exp(-x))`` with kvf::exp (vec.h), which may differ from
// torch's Sleef exp in the last fp32 bit or two; the bf16 rounding almost always hides that.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include "vec.h"

namespace {

using namespace kvf;

inline vf silu(vf x) { return div(x, add(set1(1.0f), kvf::exp(sub(zero(), x)))); }

template <typename T>
void silu_mul_rows(const T* src, T* dst, int64_t I, int64_t begin, int64_t end) {
  const int64_t full = I / kLanes * kLanes, rest = I - full;
  for (int64_t t = begin; t < end; ++t) {
    const T* g = src + t * 2 * I;
    const T* u = g + I;
    T* o = dst + t * I;
    for (int64_t i = 0; i < full; i += kLanes) store(o + i, mul(round_as<T>(silu(load(g + i))), load(u + i)));
    if (rest)
      store_partial(o + full, mul(round_as<T>(silu(load_partial(g + full, rest))), load_partial(u + full, rest)), rest);
  }
}

}  // namespace

at::Tensor silu_mul(const at::Tensor& gate_up) {
  const auto dtype = gate_up.scalar_type();
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && (dtype == at::kBFloat16 || dtype == at::kFloat) &&
                  gate_up.size(1) % 2 == 0,
              "silu_mul: contiguous fp32 or bf16 [T, 2 * intermediate]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  at::parallel_for(0, T, std::max<int64_t>(1, 32768 / I), [&](int64_t begin, int64_t end) {
    if (dtype == at::kFloat)
      silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), I, begin, end);
    else
      silu_mul_rows<bf16>(gate_up.data_ptr<bf16>(), out.data_ptr<bf16>(), I, begin, end);
  });
  return out;
}
