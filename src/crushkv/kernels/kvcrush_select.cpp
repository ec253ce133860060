// KVCrush token selection (signatures, anchor, Hamming distances, bucket picks) in one call for all stacked rows.
//
// Same kept sets as the PyTorch-op path of crushkv.policies.kvcrush (`_representatives`), ties included:
// * region = valid slots that are neither sink nor recent;
// * signature bit s of a region slot = the token is among the floor(|region|/2) highest scores of signature head s
//   (ties to the earlier token by order key), read by position where the KV heads hold different tokens;
// * distance = popcount(signature ^ anchor); the candidates (region, not kept by the host) are ranked by
//   (distance, order key) and the bucket rule's ranks are kept, topped up from the fillers when too few.
// Two parallel passes: per (batch row, region row) the exact top-half thresholds (a sampled selection: one pass
// over the scores instead of a multi-pass introselect), then per batch row the packed signatures (<= 64 bits),
// the anchor and the picks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBucket = 0, kOvg = 1, kLinspace = 2;

#if defined(__AVX2__)
// Lane indices that move the lanes set in an 8-bit mask to the front (a compress-store on AVX2).
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        if ((mask >> i) & 1) lanes[mask][k++] = i;
      }
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};
const CompressTable kCompress;
#endif

// src[i], or -inf where a mask is given and mask[i] is 0 (a slot outside the region).
inline float masked(const float* src, const uint8_t* mask, int64_t i) {
  return mask == nullptr || mask[i] ? src[i] : -std::numeric_limits<float>::infinity();
}

// Appends the values of src[0, size) in [lower, upper] to dst (which has room for size) and returns how many;
// *above counts those > upper. With a mask, slots where it is 0 read as -inf (so the first pass over a row needs
// no masked copy of it). Branch-free: a compress-store of 8 lanes at a time where AVX2 is there.
int64_t partition_inside(const float* src, const uint8_t* mask, int64_t size, float lower, float upper, float* dst,
                         int64_t* above) {
  int64_t over = 0, kept = 0, i = 0;
#if defined(__AVX2__)
  const __m256 lo = _mm256_set1_ps(lower), up = _mm256_set1_ps(upper);
  const __m256 neg = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (; i + 8 <= size; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    if (mask != nullptr) {  // the same branch for the whole row: predicted
      int64_t bytes;
      std::memcpy(&bytes, mask + i, 8);
      const __m256i in = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
      v = _mm256_blendv_ps(neg, v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(in, _mm256_setzero_si256())));
    }
    const __m256 gt = _mm256_cmp_ps(v, up, _CMP_GT_OQ);
    const int in = _mm256_movemask_ps(_mm256_andnot_ps(gt, _mm256_cmp_ps(v, lo, _CMP_GE_OQ)));
    over += std::popcount(static_cast<unsigned>(_mm256_movemask_ps(gt)));
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[in]));
    _mm256_storeu_ps(dst + kept, _mm256_permutevar8x32_ps(v, lanes));  // kept + 8 <= i + 8 <= size
    kept += std::popcount(static_cast<unsigned>(in));
  }
#endif
  for (; i < size; ++i) {
    const float v = masked(src, mask, i);
    over += v > upper;
    dst[kept] = v;
    kept += (v >= lower) & (v <= upper);
  }
  *above = over;
  return kept;
}

// r-th largest of buf[0, size) by counting, for each value, the values above and equal to it: ~size^2 / 2
// compares in vectorised loops with one predictable branch per value, cheaper than std::nth_element's
// data-dependent branches at the sizes the sampled selection leaves (<= 64). NaNs (never a rank) fall through.
float rank_select(float* buf, int64_t size, int64_t r) {
  for (int64_t i = 0; i < size; ++i) {
    const float v = buf[i];
    int32_t greater = 0, equal = 0;
    for (int64_t j = 0; j < size; ++j) {
      greater += buf[j] > v;
      equal += buf[j] == v;
    }
    if (greater <= r && r < greater + equal) return v;
  }
  std::nth_element(buf, buf + r, buf + size, std::greater<float>());
  return buf[r];
}

// r-th largest (0-based, r < size) of src[0, size), slots where mask is 0 (if given) read as -inf; buf and tmp are
// scratch of `size` floats. Sampled selection (Floyd-Rivest style): 16 evenly spaced values bracket the target
// rank, one branch-free pass counts the values above the bracket and moves those inside it (about a quarter) to
// scratch, and the search goes on there; when the bracket misses, a second pass keeps the side that holds the
// rank. Exact whatever the sample; about 1.3 passes over the row where introselect (std::nth_element, kthvalue)
// makes several with unpredictable branches.
float select_desc(const float* src, const uint8_t* mask, float* buf, float* tmp, int64_t size, int64_t r) {
  constexpr int64_t kSample = 16, kDelta = 2;
  const float inf = std::numeric_limits<float>::infinity();
  const float* cur = src;  // the values still searched: the row itself, then scratch
  while (size > 4 * kSample) {
    float sample[kSample], ranked[kSample];
    for (int64_t i = 0; i < kSample; ++i) sample[i] = masked(cur, mask, (2 * i + 1) * size / (2 * kSample));
    for (int64_t i = 0; i < kSample; ++i) {  // the sample sorted descending, ties by index: a branch-free rank sort
      int32_t rank = 0;
      for (int64_t j = 0; j < kSample; ++j) rank += (sample[j] > sample[i]) | ((sample[j] == sample[i]) & (j < i));
      ranked[rank] = sample[i];
    }
    const int64_t q = r * kSample / size;
    const float upper = q - kDelta >= 0 ? ranked[q - kDelta] : inf;
    const float lower = q + kDelta < kSample ? ranked[q + kDelta] : -inf;
    int64_t above = 0;
    const int64_t inside = partition_inside(cur, mask, size, lower, upper, tmp, &above);
    int64_t kept = inside;
    if (r < above) {  // the bracket missed: keep the side that holds the rank
      int64_t ignored = 0;
      kept = partition_inside(cur, mask, size, std::nextafter(upper, inf), inf, tmp, &ignored);
    } else if (r >= above + inside) {
      int64_t ignored = 0;
      kept = partition_inside(cur, mask, size, -inf, std::nextafter(lower, -inf), tmp, &ignored);
      r -= above + inside;
    } else {
      r -= above;
    }
    if (kept == size) break;  // the sample did not split the values (many equal ones): select directly
    size = kept;
    cur = tmp;
    mask = nullptr;
    std::swap(buf, tmp);
  }
  if (cur != buf) {  // the row itself or the last scratch: the final selection reorders its own copy
    for (int64_t i = 0; i < size; ++i) buf[i] = masked(cur, mask, i);
  }
  if (size <= 4 * kSample) return rank_select(buf, size, r);
  std::nth_element(buf, buf + r, buf + size, std::greater<float>());
  return buf[r];
}

struct Rows {
  const float* scores;  // [B, S, n], strides ss0/ss1, last dim contiguous
  int64_t ss0, ss1;
  const bool* valid;  // [B, H, n]
  int64_t vs0, vs1;
  const int64_t* positions;
  int64_t ps0, ps1;
  const bool* host;
  int64_t hs0, hs1;
  const int64_t* order;  // nullptr: slot order is token order
  int64_t os0, os1;
  const int64_t* start;
  int64_t seen, sink, recent, n, h;
  std::vector<uint8_t> region;  // [B, H, n]: valid, neither sink nor recent

  const uint8_t* region_row(int64_t b, int64_t row) const { return region.data() + (b * h + row) * n; }
  const int64_t* position_row(int64_t b, int64_t row) const { return positions + b * ps0 + row * ps1; }
  int64_t key(int64_t b, int64_t row, int64_t j) const { return order ? order[b * os0 + row * os1 + j] : j; }
};

// Signature bits of one region row's heads [s0, s1) into sig[0, n) (bit s: top half of head s's region scores).
// As in the op path, head s ranks all n slots with the ones outside the region at -inf, ties to the earlier token.
void signature_bits(const Rows& rows, int64_t b, int64_t r, int64_t s0, int64_t s1, uint64_t* sig,
                    std::vector<float>& buf, std::vector<float>& tmp, std::vector<int64_t>& ties) {
  const int64_t n = rows.n;
  const uint8_t* region = rows.region_row(b, r);
  std::fill(sig, sig + n, 0);
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) m += region[j];
  const int64_t t = m / 2;
  if (t == 0) return;
  const float neg = -std::numeric_limits<float>::infinity();
  buf.resize(n);
  tmp.resize(n);
  for (int64_t s = s0; s < s1; ++s) {
    const float* row = rows.scores + b * rows.ss0 + s * rows.ss1;
    const float kth = select_desc(row, region, buf.data(), tmp.data(), n, t - 1);
    const uint64_t bit = uint64_t{1} << s;
    int64_t at_least = 0;
    for (int64_t j = 0; j < n; ++j) {
      const bool in = (region[j] ? row[j] : neg) >= kth;
      at_least += in;
      sig[j] |= in ? bit : 0;
    }
    if (at_least == t) continue;  // no tie at the threshold (the usual case; never when it is -inf)
    // Ties at the threshold: keep the earliest tokens, then drop the slots outside the region again.
    ties.clear();
    int64_t above = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float v = region[j] ? row[j] : neg;
      above += v > kth;
      if (v == kth) ties.push_back(j);
      if (v == kth) sig[j] &= ~bit;
    }
    const int64_t need = t - above;
    std::nth_element(ties.begin(), ties.begin() + (need - 1), ties.end(),
                     [&](int64_t x, int64_t y) { return rows.key(b, r, x) < rows.key(b, r, y); });
    for (int64_t i = 0; i < need; ++i) sig[ties[i]] |= region[ties[i]] ? bit : 0;
  }
}

int64_t bucket_rank(int64_t i, int64_t m, int64_t k, int64_t rule) {
  if (rule == kBucket) return i * m / k;
  if (rule == kOvg) return i * (m / k);
  return k > 1 ? i * (m - 1) / (k - 1) : 0;
}

// Picks of one selection row into out[0, n): `dist` holds the distances of its region slots.
void pick_row(const Rows& rows, int64_t b, int64_t hrow, const int32_t* dist, int64_t k, int64_t rule, bool* out,
              std::vector<int64_t>& cand, std::vector<int64_t>& sorted, std::vector<int64_t>& rest) {
  const int64_t n = rows.n;
  const bool* host = rows.host + b * rows.hs0 + hrow * rows.hs1;
  const uint8_t* region = rows.region_row(b, hrow);
  auto key = [&](int64_t j) { return rows.key(b, hrow, j); };
  auto by_key = [&](int64_t x, int64_t y) { return key(x) < key(y); };
  cand.resize(n);
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {  // branch-free: region and host bits are as good as random
    cand[m] = j;
    m += region[j] & !host[j];
  }
  cand.resize(m);
  if (m == k + 1 && rule != kLinspace) {  // steady decoding: buckets of one, drop the last in (distance, order)
    int64_t drop = cand[0];
    for (int64_t j : cand) {
      if (dist[j] > dist[drop] || (dist[j] == dist[drop] && key(j) > key(drop))) drop = j;
    }
    for (int64_t j : cand) out[j] = j != drop;
    return;
  }
  const int64_t taken = std::min(m, k);
  if (taken > 0) {  // stable counting sort by distance, then each distance's run by order key
    int32_t width = 0;
    for (int64_t j : cand) width = std::max(width, dist[j] + 1);
    std::vector<int64_t> first(width + 1, 0);
    for (int64_t j : cand) ++first[dist[j] + 1];
    for (int32_t d = 0; d < width; ++d) first[d + 1] += first[d];
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    sorted.resize(m);
    for (int64_t j : cand) sorted[next[dist[j]]++] = j;
    if (rows.order) {
      for (int32_t d = 0; d < width; ++d) std::sort(sorted.begin() + first[d], sorted.begin() + first[d + 1], by_key);
    }
    for (int64_t i = 0; i < taken; ++i) out[sorted[bucket_rank(i, m, taken, rule)]] = true;
  }
  if (taken < k) {  // too few candidates: the fillers (not kept by the host) by order, then the host's slots
    rest.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (!host[j] && !region[j]) rest.push_back(j);
    }
    const auto fillers = static_cast<int64_t>(rest.size());
    for (int64_t j = 0; j < n; ++j) {
      if (host[j]) rest.push_back(j);
    }
    TORCH_CHECK(static_cast<int64_t>(rest.size()) >= k - taken, "crushkv.kvcrush_reps: fewer slots than picks");
    std::sort(rest.begin(), rest.begin() + fillers, by_key);
    std::sort(rest.begin() + fillers, rest.end(), by_key);
    for (int64_t i = 0; i < k - taken; ++i) out[rest[i]] = true;
  }
  const bool* valid = rows.valid + b * rows.vs0 + hrow * rows.vs1;
  for (int64_t j = 0; j < n; ++j) out[j] = out[j] && valid[j];
}

// Distances of one batch row's region slots to their row's anchor, then the picks of every selection row.
// hr > 1: a token's signature is the OR of the bits every KV head holds for its position (0 where a head evicted it).
void distances_and_picks(const Rows& rows, int64_t b, int64_t hr, int64_t nsig, const uint64_t* own,
                         const bool* anchor, int64_t k, int64_t rule, bool* out, std::vector<uint64_t>& by_position,
                         std::vector<uint64_t>& words, std::vector<int32_t>& dist, std::vector<int64_t>& cand,
                         std::vector<int64_t>& sorted, std::vector<int64_t>& rest) {
  const int64_t n = rows.n;
  // Slots outside the region read and write position 0 with no bits (branch-free; their positions may be anything).
  auto at = [](const uint8_t* region, const int64_t* pos, int64_t j) { return region[j] ? pos[j] : 0; };
  if (hr > 1) {
    for (int64_t r = 0; r < hr; ++r) {
      const uint8_t* region = rows.region_row(b, r);
      const int64_t* pos = rows.position_row(b, r);
      const uint64_t* bits = own + r * n;
      for (int64_t j = 0; j < n; ++j) by_position[at(region, pos, j)] |= region[j] ? bits[j] : 0;
    }
  }
  for (int64_t r = 0; r < hr; ++r) {
    const uint8_t* region = rows.region_row(b, r);
    const int64_t* pos = rows.position_row(b, r);
    words.resize(n);
    if (hr > 1) {
      for (int64_t j = 0; j < n; ++j) words[j] = region[j] ? by_position[at(region, pos, j)] : 0;
    } else {
      for (int64_t j = 0; j < n; ++j) words[j] = region[j] ? own[j] : 0;
    }
    uint64_t anchor_bits = 0;
    if (anchor == nullptr) {  // "mean": strictly more than half of the row's region tokens have the bit
      int64_t count = 0;
      for (int64_t j = 0; j < n; ++j) count += region[j];
      for (int64_t s = 0; s < nsig; ++s) {
        int64_t ones = 0;
        for (int64_t j = 0; j < n; ++j) ones += (words[j] >> s) & 1;  // 0 outside the region
        anchor_bits |= 2 * ones > count ? uint64_t{1} << s : 0;
      }
    } else {
      for (int64_t s = 0; s < nsig; ++s) anchor_bits |= anchor[b * nsig + s] ? uint64_t{1} << s : 0;
    }
    for (int64_t j = 0; j < n; ++j) dist[j] = std::popcount(words[j] ^ anchor_bits);
    // rows reading these distances: this one, or every row when all rows hold the same tokens per slot
    for (int64_t row = hr > 1 ? r : 0; row < (hr > 1 ? r + 1 : rows.h); ++row) {
      pick_row(rows, b, row, dist.data(), k, rule, out + (b * rows.h + row) * n, cand, sorted, rest);
    }
  }
  if (hr > 1) {  // clear what this batch row set, for the next one
    for (int64_t r = 0; r < hr; ++r) {
      const uint8_t* region = rows.region_row(b, r);
      const int64_t* pos = rows.position_row(b, r);
      for (int64_t j = 0; j < n; ++j) by_position[at(region, pos, j)] = 0;
    }
  }
}

void check_rows(const at::Tensor& t, at::ScalarType dtype, int64_t b, int64_t h, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == b && t.size(1) == h && t.size(2) == n && t.scalar_type() == dtype &&
                  (n <= 1 || t.stride(2) == 1),
              "crushkv.kvcrush_reps: ", name, " must be [B, H, n] of ", c10::toString(dtype),
              ", last dim contiguous");
}

// scores [B, S, n] fp32; valid/positions/host (and order, or an empty tensor) [B, H, n]; start [B];
// signature_rows: 1 (every row holds the same tokens per slot: one signature per slot) or H (by position);
// anchor [B, S] bool, or an empty tensor for the per-row majority ("mean"). Returns the picks [B, H, n] (valid only).
at::Tensor kvcrush_reps(const at::Tensor& scores, const at::Tensor& valid, const at::Tensor& positions,
                        const at::Tensor& start, int64_t seen, int64_t sink, int64_t recent, const at::Tensor& host,
                        const at::Tensor& order, const at::Tensor& anchor, int64_t signature_rows, int64_t k,
                        int64_t rule) {
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kFloat, "crushkv.kvcrush_reps: fp32 [B, S, n] scores");
  const int64_t b = scores.size(0), nsig = scores.size(1), n = scores.size(2), h = valid.size(1);
  TORCH_CHECK(n <= 1 || scores.stride(2) == 1, "crushkv.kvcrush_reps: scores' last dim must be contiguous");
  TORCH_CHECK(nsig >= 1 && nsig <= 64, "crushkv.kvcrush_reps: 1 to 64 signature heads");
  TORCH_CHECK(signature_rows == 1 || (signature_rows == h && nsig % h == 0),
              "crushkv.kvcrush_reps: signature_rows must be 1 or H (dividing the signature heads)");
  TORCH_CHECK(rule >= kBucket && rule <= kLinspace && k >= 0, "crushkv.kvcrush_reps: bad rule or k");
  check_rows(valid, at::kBool, b, h, n, "valid");
  check_rows(positions, at::kLong, b, h, n, "positions");
  check_rows(host, at::kBool, b, h, n, "host");
  const bool ordered = order.numel() == 0;
  if (!ordered) check_rows(order, at::kLong, b, h, n, "order");
  TORCH_CHECK(start.dim() == 1 && start.size(0) == b && start.scalar_type() == at::kLong && start.is_contiguous(),
              "crushkv.kvcrush_reps: start must be [B] int64");
  const bool mean = anchor.numel() == 0;
  TORCH_CHECK(mean || (anchor.dim() == 2 && anchor.size(0) == b && anchor.size(1) == nsig &&
                       anchor.scalar_type() == at::kBool),
              "crushkv.kvcrush_reps: anchor must be [B, S] bool or empty");
  at::Tensor out = at::zeros({b, h, n}, valid.options());
  if (k == 0 || n == 0 || b == 0) return out;
  const at::Tensor anchor_c = mean ? anchor : anchor.contiguous();

  Rows rows{scores.data_ptr<float>(),
            scores.stride(0),
            scores.stride(1),
            valid.data_ptr<bool>(),
            valid.stride(0),
            valid.stride(1),
            positions.data_ptr<int64_t>(),
            positions.stride(0),
            positions.stride(1),
            host.data_ptr<bool>(),
            host.stride(0),
            host.stride(1),
            ordered ? nullptr : order.data_ptr<int64_t>(),
            ordered ? 0 : order.stride(0),
            ordered ? 0 : order.stride(1),
            start.data_ptr<int64_t>(),
            seen,
            sink,
            recent,
            n,
            h,
            std::vector<uint8_t>(static_cast<size_t>(b * h * n))};
  const int64_t hr = signature_rows, per_row = nsig / hr;
  std::atomic<bool> bad_position{false};
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t bi = begin; bi < end; ++bi) {
      // branch-free over the slots: a sink or recent window of size 0 puts its bound out of reach
      const int64_t first = sink > 0 ? rows.start[bi] + sink : std::numeric_limits<int64_t>::min();
      const int64_t last = recent > 0 ? seen - recent : std::numeric_limits<int64_t>::max();
      for (int64_t row = 0; row < h; ++row) {
        const bool* v = rows.valid + bi * rows.vs0 + row * rows.vs1;
        const int64_t* pos = rows.position_row(bi, row);
        uint8_t* region = rows.region.data() + (bi * h + row) * n;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t p = pos[j];
          const bool in = v[j] & (p >= first) & (p < last);
          region[j] = in;
          bad |= in & ((p < 0) | (p >= seen));  // read by position below when hr > 1
        }
      }
    }
    if (bad && hr > 1) bad_position = true;
  });
  TORCH_CHECK(!bad_position, "crushkv.kvcrush_reps: a region slot's position is outside [0, seen)");

  std::vector<uint64_t> sig(static_cast<size_t>(b * hr * n));
  at::parallel_for(0, b * hr, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, tmp;
    std::vector<int64_t> ties;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % hr;
      signature_bits(rows, task / hr, r, r * per_row, (r + 1) * per_row, sig.data() + task * n, buf, tmp, ties);
    }
  });
  const bool* anchor_p = mean ? nullptr : anchor_c.data_ptr<bool>();
  bool* out_p = out.data_ptr<bool>();
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> by_position(hr > 1 ? std::max<int64_t>(seen, 1) : 0), words;
    std::vector<int32_t> dist(n);
    std::vector<int64_t> cand, sorted, rest;
    for (int64_t bi = begin; bi < end; ++bi) {
      distances_and_picks(rows, bi, hr, nsig, sig.data() + bi * hr * n, anchor_p, k, rule, out_p, by_position, words,
                          dist, cand, sorted, rest);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crushkv, m) {
  m.def(
      "kvcrush_reps(Tensor scores, Tensor valid, Tensor positions, Tensor start, int seen, int sink, int recent, "
      "Tensor host, Tensor order, Tensor anchor, int signature_rows, int k, int rule) -> Tensor");
}

TORCH_LIBRARY_IMPL(crushkv, CPU, m) { m.impl("kvcrush_reps", &kvcrush_reps); }
