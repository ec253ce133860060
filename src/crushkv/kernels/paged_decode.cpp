// Decode-time attention read straight from a paged pool (store=paged): no gather of the pages into a dense tensor.
//
// One task = one (batch row, KV head): every query row of its G query heads against that row's pages, in block-table
// order. A page of keys is loaded once for all the task's rows; the logits of a row (the row's slots, masked by
// `visible`) are turned into probabilities in place, written out when the caller needs them for statistics, and
// multiplied page by page with the values. Tasks run over the intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using crushkv::axpy;
using crushkv::dot;
using crushkv::softmax;
using Vec = at::vec::Vectorized<float>;

// rows [B, Hk, R, d] (R = G * q, row r = g * q + i), pool_keys [P, page, d], pool_values [P, page, dv],
// table [B * Hk, W] page ids, visible [B, Hv, q, n] (Hv = 1 or Hk), all contiguous, fp32 / int64 / bool.
// Returns out [B, Hk, R, dv] and, when want_probs, probs [B, Hk, R, n] (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> paged_attend(const at::Tensor& rows, const at::Tensor& pool_keys,
                                                const at::Tensor& pool_values, const at::Tensor& table, int64_t n,
                                                const at::Tensor& visible, double scale, bool want_probs) {
  TORCH_CHECK(rows.dim() == 4 && pool_keys.dim() == 3 && pool_values.dim() == 3 && table.dim() == 2 &&
                  visible.dim() == 4,
              "crushkv.paged_attend: bad ranks");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && pool_keys.scalar_type() == at::kFloat &&
                  pool_values.scalar_type() == at::kFloat,
              "crushkv.paged_attend: fp32 only");
  TORCH_CHECK(table.scalar_type() == at::kLong && visible.scalar_type() == at::kBool,
              "crushkv.paged_attend: int64 table and bool mask");
  TORCH_CHECK(rows.is_contiguous() && pool_keys.is_contiguous() && pool_values.is_contiguous() &&
                  table.is_contiguous() && visible.is_contiguous(),
              "crushkv.paged_attend: contiguous inputs only");
  const int64_t b = rows.size(0), hk = rows.size(1), r = rows.size(2), d = rows.size(3);
  const int64_t page = pool_keys.size(1), dv = pool_values.size(2), width = table.size(1);
  const int64_t hv = visible.size(1), q = visible.size(2);
  TORCH_CHECK(pool_keys.size(2) == d && pool_values.size(1) == page && pool_values.size(0) == pool_keys.size(0),
              "crushkv.paged_attend: pool shapes");
  TORCH_CHECK(table.size(0) == b * hk && width * page >= n, "crushkv.paged_attend: table must map n slots per row");
  TORCH_CHECK(visible.size(0) == b && (hv == 1 || hv == hk) && q > 0 && r % q == 0 && visible.size(3) == n,
              "crushkv.paged_attend: visible must be [B, 1 or Hk, q, n]");

  const auto opts = rows.options();
  at::Tensor out = at::zeros({b, hk, r, dv}, opts);
  at::Tensor probs = want_probs ? at::empty({b, hk, r, n}, opts) : at::empty({0}, opts);
  const float* qp = rows.data_ptr<float>();
  const float* kp = pool_keys.data_ptr<float>();
  const float* vp = pool_values.data_ptr<float>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const bool* mp = visible.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  float* pp = want_probs ? probs.data_ptr<float>() : nullptr;
  const float neg = -std::numeric_limits<float>::infinity();
  const int64_t pages = (n + page - 1) / page;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, b * hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / hk, kv = task % hk;
      const float* qh = qp + task * r * d;
      const int64_t* ids = tp + task * width;
      const bool* mask = mp + (bi * hv + (hv == 1 ? 0 : kv)) * q * n;
      float* logits = pp != nullptr ? pp + task * r * n : nullptr;
      if (logits == nullptr) {
        scratch.resize(static_cast<size_t>(r * n));
        logits = scratch.data();
      }
      for (int64_t p = 0; p < pages; ++p) {
        const float* keys = kp + ids[p] * page * d;
        const int64_t slots = std::min(page, n - p * page);
        for (int64_t row = 0; row < r; ++row) {
          const float* query = qh + row * d;
          const bool* seen = mask + (row % q) * n + p * page;
          float* dst = logits + row * n + p * page;
          for (int64_t s = 0; s < slots; ++s) dst[s] = seen[s] ? dot(query, keys + s * d, d) * fscale : neg;
        }
      }
      for (int64_t row = 0; row < r; ++row) softmax(logits + row * n, n);
      float* oh = op + task * r * dv;
      for (int64_t p = 0; p < pages; ++p) {
        const float* values = vp + ids[p] * page * dv;
        const int64_t slots = std::min(page, n - p * page);
        for (int64_t row = 0; row < r; ++row) {
          const float* weights = logits + row * n + p * page;
          for (int64_t s = 0; s < slots; ++s) {
            if (weights[s] != 0.0f) axpy(oh + row * dv, values + s * dv, weights[s], dv);
          }
        }
      }
    }
  });
  return {out, probs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crushkv, m) {
  m.def(
      "paged_attend(Tensor rows, Tensor pool_keys, Tensor pool_values, Tensor table, int n, Tensor visible, "
      "float scale, bool want_probs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crushkv, CPU, m) { m.impl("paged_attend", &paged_attend); }
