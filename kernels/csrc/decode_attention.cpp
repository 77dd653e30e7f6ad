// Decode attention on the CPU: one query token per request, read straight from the paged cache.
//
// The torch reference gathers each request's blocks into a contiguous copy and calls SDPA; at one
// query token both the copy and SDPA's set-up cost more than the attention itself. Here each
// request walks its block table twice: the scores of all its heads in fp32 (K rows widened from the
// cache dtype, fp32 or bf16, as they are read), an exact softmax, then the V rows weighted in fp32,
// rounded to the cache dtype once at the end. Requests are split between threads only when the
// batch has enough work.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec.h"

namespace {

using namespace kvf;

// All heads of one request. q [H, D] (head stride q_head_stride), out [H, D] contiguous. Each cached
// token's K (then V) row holds every KV head: it is read once, in order, for all of them.
template <typename T>
void attend(const T* q, int64_t q_head_stride, const T* cache, const int32_t* table, int64_t len, int64_t H,
            int64_t KVH, int64_t D, int64_t block_size, int64_t block_stride, int64_t v_offset, float scale, T* out) {
  const int64_t group = H / KVH, row = KVH * D;
  std::vector<float> qf(H * D), scores(H * len), acc(H * D, 0.0f);
  for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(q[(i / D) * q_head_stride + i % D]) * scale;
  auto row_of = [&](int64_t t) { return cache + table[t / block_size] * block_stride + (t % block_size) * row; };
  for (int64_t t = 0; t < len; ++t) {  // scores: q . k, each K row loaded once for its group of heads
    if (t + 4 < len) _mm_prefetch(reinterpret_cast<const char*>(row_of(t + 4)), _MM_HINT_T0);
    const T* k = row_of(t);
    for (int64_t h = 0; h < H; ++h) {
      const T* kh = k + (h / group) * D;
      vf s = zero();
      for (int64_t c = 0; c < D; c += kLanes) s = fma(load(&qf[h * D + c]), load(kh + c), s);
      scores[h * len + t] = reduce_add(s);
    }
  }
  const int64_t full = len / kLanes * kLanes;
  for (int64_t h = 0; h < H; ++h) {  // exact softmax, in place (kvf::exp: within ~2 ulp)
    float* sh = &scores[h * len];
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) mx = std::max(mx, sh[t]);
    const vf vmx = set1(mx);
    vf vsum = zero();
    for (int64_t t = 0; t < full; t += kLanes) {
      const vf e = kvf::exp(sub(load(sh + t), vmx));
      store(sh + t, e);
      vsum = add(vsum, e);
    }
    float sum = reduce_add(vsum);
    for (int64_t t = full; t < len; ++t) {  // the tail on its own: no padded lanes in the sum
      const float e = std::exp(sh[t] - mx);
      sh[t] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
  }
  for (int64_t t = 0; t < len; ++t) {  // out = sum_t p_t v_t
    if (t + 4 < len) _mm_prefetch(reinterpret_cast<const char*>(row_of(t + 4) + v_offset), _MM_HINT_T0);
    const T* v = row_of(t) + v_offset;
    for (int64_t h = 0; h < H; ++h) {
      const T* vh = v + (h / group) * D;
      const vf p = set1(scores[h * len + t]);
      for (int64_t c = 0; c < D; c += kLanes) {
        float* a = &acc[h * D + c];
        store(a, fma(p, load(vh + c), load(a)));
      }
    }
  }
  for (int64_t i = 0; i < H * D; i += kLanes) store(out + i, load(&acc[i]));
}

template <typename T>
void run(const at::Tensor& query, const at::Tensor& kv_cache, const int32_t* tables, const int32_t* lens,
         int64_t max_blocks, float scale, at::Tensor& out) {
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), KVH = kv_cache.size(3);
  const T* cache = kv_cache.data_ptr<T>();
  const int64_t block_stride = block_size * KVH * D, v_offset = num_blocks * block_stride;
  // One task per request; a small batch is not worth waking threads for.
  int64_t total_len = 0;
  for (int64_t b = 0; b < B; ++b) total_len += lens[b];
  const int64_t grain = total_len * H * D < (1 << 18) ? B : 1;
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      attend<T>(query.data_ptr<T>() + b * query.stride(0), query.stride(1), cache, tables + b * max_blocks, lens[b], H,
                KVH, D, block_size, block_stride, v_offset, scale, out.data_ptr<T>() + b * H * D);
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "decode_attention: shapes ",
              query.sizes(), " ", kv_cache.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && kv_cache.scalar_type() == dtype,
              "decode_attention: fp32 or bf16 query and cache of one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "decode_attention: int32 block tables and lengths");
  TORCH_CHECK(kv_cache.is_contiguous() && block_tables.is_contiguous() && context_lens.is_contiguous(),
              "decode_attention: contiguous cache and tables");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && D % 16 == 0 && H % KVH == 0, "decode_attention: head_dim ", D,
              " (a multiple of 16), ", H, " heads over ", KVH, " KV heads");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "decode_attention: one table per request");
  TORCH_CHECK(query.stride(2) == 1, "decode_attention: query rows must be contiguous");
  const int64_t max_blocks = block_tables.size(1);  // query may be strided over tokens and heads
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "decode_attention: context length ", lens[b],
                " with ", max_blocks, " blocks of ", block_size);
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * max_blocks + i] >= 0 && tables[b * max_blocks + i] < num_blocks,
                  "decode_attention: block id ", tables[b * max_blocks + i], " out of range");
  }
  auto out = at::empty({B, H, D}, query.options());
  if (dtype == at::kFloat)
    run<float>(query, kv_cache, tables, lens, max_blocks, static_cast<float>(scale), out);
  else
    run<bf16>(query, kv_cache, tables, lens, max_blocks, static_cast<float>(scale), out);
  return out;
}
