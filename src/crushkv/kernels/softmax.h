// The shared first half of a row softmax for crushkv's CPU kernels: exponentiate row[0, len) in place, shifted by
// the row's maximum, and return the sum (the caller normalises, and accumulates what it needs on the way).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace crushkv {

inline float exp_shifted_sum(float* row, int64_t len) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t n = Vec::size();
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + n <= len; j += n) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < len; ++j) mx = std::max(mx, row[j]);
  const Vec shift(mx);
  Vec vsum(0.0f);
  j = 0;
  for (; j + n <= len; j += n) {
    const Vec e = (Vec::loadu(row + j) - shift).exp_u20();
    e.store(row + j);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < len; ++j) {
    row[j] = std::exp(row[j] - mx);
    sum += row[j];
  }
  return sum;
}

}  // namespace crushkv
