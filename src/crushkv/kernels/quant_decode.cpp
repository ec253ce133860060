// Decode-time attention read straight from a quant= store's packed slots: no dequantized copy of the layer.
//
// Same task split as paged_attend (one task = one (batch row, KV head), every query row of its G query heads), but a
// slot's key and value are unpacked from their codes into registers-sized scratch right where they are used:
// * where[s] >= 0: a quantized token; key = codes * key_scale[where] + key_zero[where] (the group's per-channel
//   range), value = codes * value_scale[s, g] + value_zero[s, g] (the slot's per-token ranges, g = channel group);
// * where[s] = -1 - e: a token still in the full-precision residual, read from FIFO entry e;
// * where[s] = EMPTY: a released slot, never visible (the layer masks it), skipped.
// The arithmetic is the dense path's (codes * scale + zero in fp32, then the same dot products), so the output
// and the probabilities match attention over QuantStore.dense up to fp32 summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using crushkv::axpy;
using crushkv::dot;
using crushkv::softmax;
using Vec = at::vec::Vectorized<float>;
constexpr int16_t kEmpty = std::numeric_limits<int16_t>::min();

// The first d codes of bits-bit values packed along the row (code j of a byte at bit j * bits) as floats.
void unpack(const uint8_t* src, int64_t d, int64_t bits, float* dst) {
  int64_t j = 0;
#if defined(__AVX2__)
  if (bits == 8) {
    for (; j + 8 <= d; j += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j));
      _mm256_storeu_ps(dst + j, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
    }
  } else if (bits == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(15);
    for (; j + 8 <= d; j += 8) {  // 8 codes = 4 bytes = one little-endian word
      uint32_t word;
      std::memcpy(&word, src + j / 2, 4);
      const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), mask);
      _mm256_storeu_ps(dst + j, _mm256_cvtepi32_ps(codes));
    }
  } else if (bits == 2) {
    const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), high = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256i mask = _mm256_set1_epi32(3);
    for (; j + 16 <= d; j += 16) {  // 16 codes = 4 bytes
      uint32_t word;
      std::memcpy(&word, src + j / 4, 4);
      const __m256i all = _mm256_set1_epi32(static_cast<int>(word));
      _mm256_storeu_ps(dst + j, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(all, low), mask)));
      _mm256_storeu_ps(dst + j + 8, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(all, high), mask)));
    }
  }
#endif
  const int64_t per = 8 / bits, top = (1 << bits) - 1;
  for (; j < d; ++j) dst[j] = static_cast<float>((src[j / per] >> ((j % per) * bits)) & top);
}

// out[j] = codes[j] * scale[j] + zero[j]
inline void dequantize(float* codes, const float* scale, const float* zero, int64_t d) {
  const int64_t n = Vec::size();
  int64_t j = 0;
  for (; j + n <= d; j += n) {
    at::vec::fmadd(Vec::loadu(codes + j), Vec::loadu(scale + j), Vec::loadu(zero + j)).store(codes + j);
  }
  for (; j < d; ++j) codes[j] = std::fma(codes[j], scale[j], zero[j]);
}

// Per-token value ranges: channel j uses group j / size.
inline void dequantize_grouped(float* codes, const float* scale, const float* zero, int64_t d, int64_t size) {
  const int64_t n = Vec::size();
  if (size % n == 0) {
    for (int64_t j = 0; j < d; j += n) {
      const int64_t g = j / size;
      const Vec v = j + n <= d ? Vec::loadu(codes + j) : Vec::loadu(codes + j, static_cast<int>(d - j));
      const Vec out = at::vec::fmadd(v, Vec(scale[g]), Vec(zero[g]));
      if (j + n <= d) {
        out.store(codes + j);
      } else {
        out.store(codes + j, static_cast<int>(d - j));
      }
    }
    return;
  }
  for (int64_t j = 0; j < d; ++j) codes[j] = std::fma(codes[j], scale[j / size], zero[j / size]);
}

void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == dtype && t.is_contiguous(), "crushkv.quant_attend: ", name,
              " must be a contiguous ", dim, "-d ", c10::toString(dtype), " tensor");
}

// rows [B, Hk, R, d] (R = G * q), key_codes [B, Hk, C, kw] u8, key_scale/key_zero [B, Hk, rows, d],
// where [B, Hk, C] i16, value_codes [B, Hk, C, vw] u8, value_scale/value_zero [B, Hk, C, groups] (value_size
// channels each), fp_keys [B, Hk, F, d], fp_values [B, Hk, F, dv], visible [B, Hv, q, n] (Hv = 1 or Hk); fp32
// except where noted; slots 0..n-1 (n <= C) are read. Returns out [B, Hk, R, dv] and, when want_probs, the
// probabilities [B, Hk, R, n].
std::tuple<at::Tensor, at::Tensor> quant_attend(const at::Tensor& rows, const at::Tensor& key_codes,
                                                const at::Tensor& key_scale, const at::Tensor& key_zero,
                                                const at::Tensor& where, const at::Tensor& value_codes,
                                                const at::Tensor& value_scale, const at::Tensor& value_zero,
                                                const at::Tensor& fp_keys, const at::Tensor& fp_values, int64_t n,
                                                const at::Tensor& visible, double scale, int64_t bits,
                                                int64_t value_size, bool want_probs) {
  check(rows, at::kFloat, 4, "rows");
  check(key_codes, at::kByte, 4, "key_codes");
  check(key_scale, at::kFloat, 4, "key_scale");
  check(key_zero, at::kFloat, 4, "key_zero");
  check(where, at::kShort, 3, "where");
  check(value_codes, at::kByte, 4, "value_codes");
  check(value_scale, at::kFloat, 4, "value_scale");
  check(value_zero, at::kFloat, 4, "value_zero");
  check(fp_keys, at::kFloat, 4, "fp_keys");
  check(fp_values, at::kFloat, 4, "fp_values");
  check(visible, at::kBool, 4, "visible");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "crushkv.quant_attend: bits must be 2, 4 or 8");
  const int64_t b = rows.size(0), hk = rows.size(1), r = rows.size(2), d = rows.size(3);
  const int64_t cap = where.size(2), groups = key_scale.size(2), fifo = fp_keys.size(2), dv = fp_values.size(3);
  const int64_t kw = key_codes.size(3), vw = value_codes.size(3), ng = value_scale.size(3);
  const int64_t hv = visible.size(1), q = visible.size(2);
  auto same_rows = [&](const at::Tensor& t) { return t.size(0) == b && t.size(1) == hk; };
  TORCH_CHECK(same_rows(key_codes) && same_rows(key_scale) && same_rows(key_zero) && same_rows(where) &&
                  same_rows(value_codes) && same_rows(value_scale) && same_rows(value_zero) && same_rows(fp_keys) &&
                  same_rows(fp_values),
              "crushkv.quant_attend: every store tensor must have [B, Hk] leading dims");
  TORCH_CHECK(key_codes.size(2) == cap && value_codes.size(2) == cap && value_scale.size(2) == cap &&
                  value_zero.size(2) == cap && n <= cap && fp_values.size(2) == fifo,
              "crushkv.quant_attend: slot arrays disagree on the capacity");
  TORCH_CHECK(kw * 8 >= d * bits && vw * 8 >= dv * bits && key_scale.size(3) == d && fp_keys.size(3) == d &&
                  key_zero.sizes() == key_scale.sizes() && value_zero.sizes() == value_scale.sizes(),
              "crushkv.quant_attend: code widths / ranges do not match the head size");
  TORCH_CHECK(value_size > 0 && ng * value_size >= dv, "crushkv.quant_attend: value groups do not cover dv");
  TORCH_CHECK(visible.size(0) == b && (hv == 1 || hv == hk) && q > 0 && r % q == 0 && visible.size(3) == n,
              "crushkv.quant_attend: visible must be [B, 1 or Hk, q, n]");

  const auto opts = rows.options();
  at::Tensor out = at::zeros({b, hk, r, dv}, opts);
  at::Tensor probs = want_probs ? at::empty({b, hk, r, n}, opts) : at::empty({0}, opts);
  const float* qp = rows.data_ptr<float>();
  const uint8_t* kc = key_codes.data_ptr<uint8_t>();
  const float* ks = key_scale.data_ptr<float>();
  const float* kz = key_zero.data_ptr<float>();
  const int16_t* wp = where.data_ptr<int16_t>();
  const uint8_t* vc = value_codes.data_ptr<uint8_t>();
  const float* vs = value_scale.data_ptr<float>();
  const float* vz = value_zero.data_ptr<float>();
  const float* fk = fp_keys.data_ptr<float>();
  const float* fv = fp_values.data_ptr<float>();
  const bool* mp = visible.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  float* pp = want_probs ? probs.data_ptr<float>() : nullptr;
  const float neg = -std::numeric_limits<float>::infinity();
  const float fscale = static_cast<float>(scale);
  std::atomic<bool> bad{false};

  at::parallel_for(0, b * hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch, key(d), value(dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / hk, kv = task % hk;
      const float* qh = qp + task * r * d;
      const int16_t* wh = wp + task * cap;
      const bool* mask = mp + (bi * hv + (hv == 1 ? 0 : kv)) * q * n;
      float* logits = pp != nullptr ? pp + task * r * n : nullptr;
      if (logits == nullptr) {
        scratch.resize(static_cast<size_t>(r * n));
        logits = scratch.data();
      }
      for (int64_t s = 0; s < n; ++s) {
        bool any = false;
        for (int64_t row = 0; row < r; ++row) any |= mask[(row % q) * n + s];
        const int16_t w = wh[s];
        if (!any || w == kEmpty) {
          for (int64_t row = 0; row < r; ++row) logits[row * n + s] = neg;
          continue;
        }
        const float* k = key.data();
        if (w >= 0) {
          if (w >= groups) bad = true;
          const int64_t g = std::min<int64_t>(w, groups - 1);
          unpack(kc + (task * cap + s) * kw, d, bits, key.data());
          dequantize(key.data(), ks + (task * groups + g) * d, kz + (task * groups + g) * d, d);
        } else {
          const int64_t e = -1 - static_cast<int64_t>(w);
          if (e >= fifo) bad = true;
          k = fk + (task * fifo + std::min(e, fifo - 1)) * d;
        }
        for (int64_t row = 0; row < r; ++row) {
          logits[row * n + s] = mask[(row % q) * n + s] ? dot(qh + row * d, k, d) * fscale : neg;
        }
      }
      for (int64_t row = 0; row < r; ++row) softmax(logits + row * n, n);
      float* oh = op + task * r * dv;
      for (int64_t s = 0; s < n; ++s) {
        bool any = false;
        for (int64_t row = 0; row < r; ++row) any |= logits[row * n + s] != 0.0f;
        if (!any) continue;
        const int16_t w = wh[s];
        const float* v = value.data();
        if (w >= 0) {
          unpack(vc + (task * cap + s) * vw, dv, bits, value.data());
          dequantize_grouped(value.data(), vs + (task * cap + s) * ng, vz + (task * cap + s) * ng, dv, value_size);
        } else {
          v = fv + (task * fifo + std::min(-1 - static_cast<int64_t>(w), fifo - 1)) * dv;
        }
        for (int64_t row = 0; row < r; ++row) {
          const float p = logits[row * n + s];
          if (p != 0.0f) axpy(oh + row * dv, v, p, dv);
        }
      }
    }
  });
  TORCH_CHECK(!bad, "crushkv.quant_attend: a slot names a key group or residual entry the store does not have");
  return {out, probs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crushkv, m) {
  m.def(
      "quant_attend(Tensor rows, Tensor key_codes, Tensor key_scale, Tensor key_zero, Tensor where, "
      "Tensor value_codes, Tensor value_scale, Tensor value_zero, Tensor fp_keys, Tensor fp_values, int n, "
      "Tensor visible, float scale, int bits, int value_size, bool want_probs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crushkv, CPU, m) { m.impl("quant_attend", &quant_attend); }
