// RMSNorm with the residual add fused, on the CPU, for fp32 and bf16 rows: one pass per row instead of
// the reference's seven tensor ops. Roundings as Hugging Face Llama (see kernels/rms_norm.py): the sum
// x + residual is rounded to the model dtype, the norm computed in fp32 from it and rounded to the
// model dtype, then multiplied by the weight (model dtype) and rounded again. Only the fp32 sum of
// squares runs in another order than torch's (vector lanes, then a fixed tree).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

#include "vec.h"

namespace {

using namespace kvf;

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, const T* w, T* sum,
                   int64_t sum_stride, T* out, int64_t hidden, float eps, int64_t begin, int64_t end) {
  const int64_t full = hidden / kLanes * kLanes, rest = hidden - full;
  for (int64_t t = begin; t < end; ++t) {
    const T* xr = x + t * x_stride;
    T* sr = sum + t * sum_stride;
    vf acc = zero();
    if (residual != nullptr) {  // the rounded sum is written and squared in the same pass
      const T* rr = residual + t * residual_stride;
      for (int64_t i = 0; i < full; i += kLanes) {
        const vf s = round_as<T>(add(load(xr + i), load(rr + i)));
        store(sr + i, s);
        acc = add(acc, mul(s, s));
      }
      if (rest) {
        const vf s = round_as<T>(add(load_partial(xr + full, rest), load_partial(rr + full, rest)));
        store_partial(sr + full, s, rest);
        acc = add(acc, mul(s, s));
      }
    } else {
      for (int64_t i = 0; i < full; i += kLanes) {
        const vf s = load(xr + i);
        acc = add(acc, mul(s, s));
      }
      if (rest) {
        const vf s = load_partial(xr + full, rest);
        acc = add(acc, mul(s, s));
      }
    }
    const float inv = 1.0f / std::sqrt(reduce_add(acc) / static_cast<float>(hidden) + eps);
    const vf vinv = set1(inv);
    T* o = out + t * hidden;
    for (int64_t i = 0; i < full; i += kLanes)
      store(o + i, mul(load(w + i), round_as<T>(mul(load(sr + i), vinv))));
    if (rest)
      store_partial(o + full, mul(load_partial(w + full, rest), round_as<T>(mul(load_partial(sr + full, rest), vinv))),
                    rest);
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight, float eps, const at::Tensor* residual, at::Tensor& sum,
         at::Tensor& out) {
  const int64_t T_ = x.size(0), hidden = x.size(1);
  at::parallel_for(0, T_, std::max<int64_t>(1, 16384 / hidden), [&](int64_t begin, int64_t end) {
    rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), residual ? residual->data_ptr<T>() : nullptr,
                     residual ? residual->stride(0) : 0, weight.data_ptr<T>(), sum.data_ptr<T>(), sum.stride(0),
                     out.data_ptr<T>(), hidden, eps, begin, end);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dtype == at::kBFloat16 || dtype == at::kFloat) && weight.scalar_type() == dtype &&
                  weight.numel() == x.size(1),
              "rms_norm: fp32 or bf16 x [T, hidden] and weight [hidden] of its dtype");
  TORCH_CHECK(x.stride(1) == 1 && weight.is_contiguous(), "rms_norm: contiguous rows");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == dtype && residual->stride(1) == 1,
                "rms_norm: residual like x");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  auto sum = has_residual ? at::empty({x.size(0), x.size(1)}, x.options()) : x;
  const at::Tensor* r = has_residual ? &*residual : nullptr;
  if (dtype == at::kFloat)
    run<float>(x, weight, static_cast<float>(eps), r, sum, out);
  else
    run<bf16>(x, weight, static_cast<float>(eps), r, sum, out);
  return {out, sum};
}
