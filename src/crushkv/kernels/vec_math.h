// Vector helpers shared by crushkv's CPU kernels: a dot product, an axpy, and the first half of a row softmax
// (exponentiate row[0, len) in place, shifted by the row's maximum, and return the sum; the caller normalises, and
// accumulates what it needs on the way).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace crushkv {

inline float dot(const float* a, const float* b, int64_t d) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t n = Vec::size();
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + n <= d; j += n) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < d; ++j) sum += a[j] * b[j];
  return sum;
}

// out[0, d) += w * x[0, d)
inline void axpy(float* out, const float* x, float w, int64_t d) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t n = Vec::size();
  const Vec vw(w);
  int64_t j = 0;
  for (; j + n <= d; j += n) at::vec::fmadd(vw, Vec::loadu(x + j), Vec::loadu(out + j)).store(out + j);
  for (; j < d; ++j) out[j] += w * x[j];
}

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

// Softmax of row[0, len) in place (masked entries are -inf and become 0).
inline void softmax(float* row, int64_t len) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t n = Vec::size();
  const float inv = 1.0f / exp_shifted_sum(row, len);
  int64_t j = 0;
  for (; j + n <= len; j += n) (Vec::loadu(row + j) * Vec(inv)).store(row + j);
  for (; j < len; ++j) row[j] *= inv;
}

}  // namespace crushkv
