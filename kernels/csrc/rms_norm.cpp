// RMSNorm with the residual add fused, on the CPU, for bf16 rows: one pass per row instead of the
// reference's seven tensor ops. Roundings as Hugging Face Llama (see kernels/rms_norm.py): the sum
// x + residual is rounded to bf16, the norm computed in fp32 from it and rounded to bf16, then
// multiplied by the bf16 weight and rounded again.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
                  weight.numel() == x.size(1),
              "rms_norm: bf16 x [T, hidden] and weight [hidden]");
  TORCH_CHECK(x.stride(1) == 1 && weight.is_contiguous(), "rms_norm: contiguous rows");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kBFloat16 && residual->stride(1) == 1,
                "rms_norm: residual like x");
  const int64_t T = x.size(0), hidden = x.size(1);
  auto out = at::empty({T, hidden}, x.options());
  auto sum = has_residual ? at::empty({T, hidden}, x.options()) : x;
  const at::BFloat16* w = weight.data_ptr<at::BFloat16>();
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / hidden), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const at::BFloat16* xr = x.data_ptr<at::BFloat16>() + t * x.stride(0);
      at::BFloat16* sr = sum.data_ptr<at::BFloat16>() + t * sum.stride(0);
      if (has_residual) {
        const at::BFloat16* rr = residual->data_ptr<at::BFloat16>() + t * residual->stride(0);
        for (int64_t i = 0; i < hidden; ++i)
          sr[i] = static_cast<at::BFloat16>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      }
      float ss = 0.0f;
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = static_cast<float>(sr[i]);
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + epsf);
      at::BFloat16* o = out.data_ptr<at::BFloat16>() + t * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        const float normed = static_cast<float>(static_cast<at::BFloat16>(static_cast<float>(sr[i]) * inv));
        o[i] = static_cast<at::BFloat16>(static_cast<float>(w[i]) * normed);
      }
    }
  });
  return {out, sum};
}
