// Exact causal prompt attention with H2O column sums, fused per (batch row, KV head, row block).
//
// One task = the query rows of positions [i0, i1) of every query head of one KV head. It computes the logits
// against keys [0, i1) into a thread-local buffer that stays in cache, turns each row into probabilities in
// place (only the row's visible prefix: no masking pass), adds them into the thread's column sums, and multiplies
// the block by the values. Tasks are handed out largest first from an atomic counter, so the causal triangle is
// balanced over the threads. A block's column sums (G x i1, thread-local) are added to its head's under that head's
// lock: extra memory is O(threads x G x L), whatever the batch and head count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

struct Task {
  int64_t head;  // flat (batch row, KV head)
  int64_t i0;
  int64_t i1;
};

// Row blocks of a causal triangle with rows * i1 ~ elements (at least 8 rows): tall near the top
// (the blocks of crushkv.attention_math._row_blocks, so both paths cut the triangle alike).
std::vector<std::pair<int64_t, int64_t>> row_blocks(int64_t q, int64_t elements) {
  std::vector<std::pair<int64_t, int64_t>> blocks;
  int64_t i0 = 0;
  while (i0 < q) {
    const double x = static_cast<double>(i0);
    int64_t rows = static_cast<int64_t>((std::sqrt(x * x + 4.0 * static_cast<double>(elements)) - x) / 2.0);
    rows = std::max<int64_t>(8, rows);
    const int64_t i1 = std::min(q, i0 + rows);
    blocks.emplace_back(i0, i1);
    i0 = i1;
  }
  return blocks;
}

// Softmax of row[0, len) in place, row[len, width) zeroed, probabilities added into acc[0, len).
inline void softmax_accumulate(float* row, int64_t len, int64_t width, float* acc) {
  const int64_t n = Vec::size();
  const float sum = crushkv::exp_shifted_sum(row, len);
  const Vec scale(1.0f / sum);
  int64_t j = 0;
  for (; j + n <= len; j += n) {
    const Vec p = Vec::loadu(row + j) * scale;
    p.store(row + j);
    (Vec::loadu(acc + j) + p).store(acc + j);
  }
  const float inv = 1.0f / sum;
  for (; j < len; ++j) {
    row[j] *= inv;
    acc[j] += row[j];
  }
  if (width > len) std::memset(row + len, 0, sizeof(float) * static_cast<size_t>(width - len));
}

// query [B, Hk, q, G, d], keys (already scaled) and values [B, Hk, q, d], all fp32 contiguous on CPU.
// Returns out [B, q, Hk, G, d], colsum [B, Hk, G, q] and, when want_last, last [B, Hk, G, q] (else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> exact_prompt(const at::Tensor& query, const at::Tensor& keys,
                                                            const at::Tensor& values, int64_t block_elements,
                                                            bool want_last) {
  TORCH_CHECK(query.dim() == 5 && keys.dim() == 4 && values.dim() == 4, "crushkv.exact_prompt: bad ranks");
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat,
              "crushkv.exact_prompt: fp32 only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous(),
              "crushkv.exact_prompt: contiguous inputs only");
  const int64_t b = query.size(0), hk = query.size(1), q = query.size(2), g = query.size(3), d = query.size(4);
  const int64_t dv = values.size(3);
  TORCH_CHECK(keys.size(0) == b && keys.size(1) == hk && keys.size(2) == q && keys.size(3) == d,
              "crushkv.exact_prompt: keys must be [B, Hk, q, d]");
  TORCH_CHECK(values.size(0) == b && values.size(1) == hk && values.size(2) == q,
              "crushkv.exact_prompt: values must be [B, Hk, q, dv]");
  TORCH_CHECK(block_elements > 0, "crushkv.exact_prompt: block_elements must be positive");

  const auto opts = query.options();
  at::Tensor out = at::empty({b, q, hk, g, dv}, opts);
  at::Tensor colsum = at::zeros({b, hk, g, q}, opts);
  at::Tensor last = want_last ? at::zeros({b, hk, g, q}, opts) : at::empty({0}, opts);
  const int64_t heads = b * hk;
  if (q == 0 || heads == 0) return {out, colsum, last};

  std::vector<Task> tasks;
  int64_t widest = 0;  // largest block, G * rows * i1 probabilities: each thread's scratch size
  for (const auto& [i0, i1] : row_blocks(q, std::max<int64_t>(1, block_elements / g))) {
    widest = std::max(widest, (i1 - i0) * g * i1);
    for (int64_t h = 0; h < heads; ++h) tasks.push_back({h, i0, i1});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) {
    return (x.i1 - x.i0) * x.i1 > (y.i1 - y.i0) * y.i1;
  });

  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::unique_ptr<std::mutex[]> locks(new std::mutex[heads]);
  std::atomic<int64_t> next{0};
  const float* qp = query.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = want_last ? last.data_ptr<float>() : nullptr;
  float* cp = colsum.data_ptr<float>();
  const int64_t ntasks = static_cast<int64_t>(tasks.size());

  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(widest));
    std::vector<float> block_sum(static_cast<size_t>(g * q));
    std::vector<float> mixed;
    for (int64_t unused = begin; unused < end; ++unused) {
      for (int64_t k = next.fetch_add(1); k < ntasks; k = next.fetch_add(1)) {
        const Task& t = tasks[k];
        const int64_t r = t.i1 - t.i0, rows = r * g, width = t.i1;
        const float* qh = qp + (t.head * q + t.i0) * g * d;
        const float* kh = kp + t.head * q * d;
        const float* vh = vp + t.head * q * dv;
        at::Tensor probs = at::from_blob(scratch.data(), {rows, width}, opts);
        at::mm_out(probs, at::from_blob(const_cast<float*>(qh), {rows, d}, opts),
                   at::from_blob(const_cast<float*>(kh), {width, d}, opts).t());
        std::fill_n(block_sum.data(), g * width, 0.0f);
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t pos = t.i0 + row / g, head = row % g;
          softmax_accumulate(scratch.data() + row * width, pos + 1, width, block_sum.data() + head * width);
        }
        {
          std::lock_guard<std::mutex> guard(locks[t.head]);
          for (int64_t head = 0; head < g; ++head) {
            float* dst = cp + (t.head * g + head) * q;
            const float* src = block_sum.data() + head * width;
            for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
          }
        }
        mixed.resize(static_cast<size_t>(rows * dv));
        at::Tensor mixed_t = at::from_blob(mixed.data(), {rows, dv}, opts);
        at::mm_out(mixed_t, probs,
                   at::from_blob(const_cast<float*>(vh), {width, dv}, opts));
        const int64_t bi = t.head / hk, kv = t.head % hk;
        for (int64_t i = 0; i < r; ++i) {  // out[bi, i0 + i, kv, :, :] is G x dv contiguous
          std::memcpy(op + (((bi * q + t.i0 + i) * hk + kv) * g) * dv, mixed.data() + i * g * dv,
                      sizeof(float) * static_cast<size_t>(g * dv));
        }
        if (lp != nullptr && t.i1 == q) {
          for (int64_t head = 0; head < g; ++head) {
            std::memcpy(lp + (t.head * g + head) * q, scratch.data() + ((r - 1) * g + head) * width,
                        sizeof(float) * static_cast<size_t>(width));
          }
        }
      }
    }
  });

  return {out, colsum, last};
}

}  // namespace

TORCH_LIBRARY(crushkv, m) {
  m.def("exact_prompt(Tensor query, Tensor keys, Tensor values, int block_elements, bool last) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crushkv, CPU, m) { m.impl("exact_prompt", &exact_prompt); }
