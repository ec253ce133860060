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
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBucket = 0, kOvg = 1, kLinspace = 2;

// t-th largest (1-based, t <= m) of buf[0, m); buf and mid are scratch. A sample of the values brackets the target
// rank; one pass counts the values above the bracket and collects those inside it, and only those are selected.
// Exact whatever the sample: when the bracket misses the rank, the whole buffer is selected instead.
float kth_largest(float* buf, int64_t m, int64_t t, std::vector<float>& sample, std::vector<float>& mid) {
  if (m < 256) {
    std::nth_element(buf, buf + (t - 1), buf + m, std::greater<float>());
    return buf[t - 1];
  }
  const int64_t s = 64;
  sample.resize(s);
  for (int64_t i = 0; i < s; ++i) sample[i] = buf[(2 * i + 1) * m / (2 * s)];
  const int64_t q = (t - 1) * s / m, delta = 8;
  const float inf = std::numeric_limits<float>::infinity();
  float upper = inf, lower = -inf;
  if (q - delta >= 0) {
    std::nth_element(sample.begin(), sample.begin() + (q - delta), sample.end(), std::greater<float>());
    upper = sample[q - delta];
  }
  if (q + delta < s) {
    std::nth_element(sample.begin(), sample.begin() + (q + delta), sample.end(), std::greater<float>());
    lower = sample[q + delta];
  }
  mid.resize(m);
  int64_t above = 0, inside = 0;
  for (int64_t i = 0; i < m; ++i) {  // branch-free: values in [lower, upper] are appended, the rest overwritten
    const float v = buf[i];
    above += v > upper;
    mid[inside] = v;
    inside += (v >= lower) & (v <= upper);
  }
  if (above < t && t <= above + inside) {
    const int64_t r = t - above - 1;
    std::nth_element(mid.begin(), mid.begin() + r, mid.begin() + inside, std::greater<float>());
    return mid[r];
  }
  std::nth_element(buf, buf + (t - 1), buf + m, std::greater<float>());
  return buf[t - 1];
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
  int64_t seen, sink, recent, n;

  bool region(int64_t b, int64_t h, int64_t j) const {
    if (!valid[b * vs0 + h * vs1 + j]) return false;
    const int64_t p = positions[b * ps0 + h * ps1 + j];
    return !((sink > 0 && p < start[b] + sink) || (recent > 0 && p >= seen - recent));
  }
  int64_t key(int64_t b, int64_t h, int64_t j) const { return order ? order[b * os0 + h * os1 + j] : j; }
};

// Signature bits of one region row's heads [s0, s1) into sig[0, n) (bit s: top half of head s's region scores).
void signature_bits(const Rows& rows, int64_t b, int64_t r, int64_t s0, int64_t s1, uint64_t* sig,
                    std::vector<int64_t>& slots, std::vector<float>& buf, std::vector<float>& sample,
                    std::vector<float>& mid, std::vector<int64_t>& ties) {
  const int64_t n = rows.n;
  slots.clear();
  for (int64_t j = 0; j < n; ++j) {
    sig[j] = 0;
    if (rows.region(b, r, j)) slots.push_back(j);
  }
  const int64_t m = static_cast<int64_t>(slots.size()), t = m / 2;
  if (t == 0) return;
  buf.resize(m);
  for (int64_t s = s0; s < s1; ++s) {
    const float* row = rows.scores + b * rows.ss0 + s * rows.ss1;
    for (int64_t i = 0; i < m; ++i) buf[i] = row[slots[i]];
    const float kth = kth_largest(buf.data(), m, t, sample, mid);
    const uint64_t bit = uint64_t{1} << s;
    int64_t above = 0, equal = 0;
    for (int64_t i = 0; i < m; ++i) {
      const float v = row[slots[i]];
      above += v > kth;
      equal += v == kth;
    }
    const bool neg_inf = kth == -std::numeric_limits<float>::infinity();
    if (above + equal == t && !neg_inf) {  // no tie to resolve (the usual case)
      for (int64_t i = 0; i < m; ++i) sig[slots[i]] |= row[slots[i]] >= kth ? bit : 0;
      continue;
    }
    for (int64_t i = 0; i < m; ++i) sig[slots[i]] |= row[slots[i]] > kth ? bit : 0;
    // Ties at the threshold: the earliest tokens. The op path ranks every slot with non-region ones at -inf, so
    // when the threshold itself is -inf those slots tie too (and then drop out of the region's bits).
    ties.clear();
    for (int64_t j = 0; j < n; ++j) {
      const bool in = rows.region(b, r, j);
      if (in ? row[j] == kth : neg_inf) ties.push_back(j);
    }
    const int64_t need = t - above;
    auto by_key = [&](int64_t x, int64_t y) { return rows.key(b, r, x) < rows.key(b, r, y); };
    std::nth_element(ties.begin(), ties.begin() + (need - 1), ties.end(), by_key);
    for (int64_t i = 0; i < need; ++i) {
      if (rows.region(b, r, ties[i])) sig[ties[i]] |= bit;
    }
  }
}

int64_t bucket_rank(int64_t i, int64_t m, int64_t k, int64_t rule) {
  if (rule == kBucket) return i * m / k;
  if (rule == kOvg) return i * (m / k);
  return k > 1 ? i * (m - 1) / (k - 1) : 0;
}

// Picks of one selection row into out[0, n): `dist` holds the distances of its region slots.
void pick_row(const Rows& rows, int64_t b, int64_t h, const int32_t* dist, int64_t k, int64_t rule, bool* out,
              std::vector<int64_t>& cand, std::vector<int64_t>& sorted, std::vector<int64_t>& rest) {
  const int64_t n = rows.n;
  const bool* host = rows.host + b * rows.hs0 + h * rows.hs1;
  cand.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (!host[j] && rows.region(b, h, j)) cand.push_back(j);
  }
  const int64_t m = static_cast<int64_t>(cand.size());
  auto key = [&](int64_t j) { return rows.key(b, h, j); };
  const bool* valid = rows.valid + b * rows.vs0 + h * rows.vs1;
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
    sorted.resize(m);
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t j : cand) sorted[fill[dist[j]]++] = j;
    if (rows.order) {
      for (int32_t d = 0; d < width; ++d) {
        std::sort(sorted.begin() + first[d], sorted.begin() + first[d + 1],
                  [&](int64_t x, int64_t y) { return key(x) < key(y); });
      }
    }
    for (int64_t i = 0; i < taken; ++i) out[sorted[bucket_rank(i, m, taken, rule)]] = true;
  }
  if (taken < k) {  // too few candidates: the fillers (not kept by the host) by order, then the host's slots
    rest.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (!host[j] && !rows.region(b, h, j)) rest.push_back(j);
    }
    const auto fillers = static_cast<int64_t>(rest.size());
    for (int64_t j = 0; j < n; ++j) {
      if (host[j]) rest.push_back(j);
    }
    auto by_key = [&](int64_t x, int64_t y) { return key(x) < key(y); };
    std::sort(rest.begin(), rest.begin() + fillers, by_key);
    std::sort(rest.begin() + fillers, rest.end(), by_key);
    TORCH_CHECK(static_cast<int64_t>(rest.size()) >= k - taken, "crushkv.kvcrush_reps: fewer slots than picks");
    for (int64_t i = 0; i < k - taken; ++i) out[rest[i]] = true;
  }
  for (int64_t j = 0; j < n; ++j) out[j] = out[j] && valid[j];
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

  Rows rows{scores.data_ptr<float>(), scores.stride(0), scores.stride(1),
            valid.data_ptr<bool>(), valid.stride(0), valid.stride(1),
            positions.data_ptr<int64_t>(), positions.stride(0), positions.stride(1),
            host.data_ptr<bool>(), host.stride(0), host.stride(1),
            ordered ? nullptr : order.data_ptr<int64_t>(), ordered ? 0 : order.stride(0), ordered ? 0 : order.stride(1),
            start.data_ptr<int64_t>(), seen, sink, recent, n};
  const int64_t hr = signature_rows, per_row = nsig / hr;
  std::vector<uint64_t> sig(static_cast<size_t>(b * hr * n));

  at::parallel_for(0, b * hr, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slots, ties;
    std::vector<float> buf, sample, mid;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / hr, r = task % hr;
      signature_bits(rows, bi, r, r * per_row, (r + 1) * per_row, sig.data() + task * n, slots, buf, sample, mid,
                     ties);
    }
  });

  const bool* anchor_p = mean ? nullptr : anchor_c.data_ptr<bool>();
  bool* out_p = out.data_ptr<bool>();
  bool bad_position = false;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> by_position(hr > 1 ? seen : 0);  // a token's signature: the bits of every KV head
    std::vector<int32_t> dist(n);
    std::vector<int64_t> cand, sorted, rest, members;
    std::vector<uint64_t> words;
    for (int64_t bi = begin; bi < end; ++bi) {
      const uint64_t* own = sig.data() + bi * hr * n;
      if (hr > 1) {
        for (int64_t r = 0; r < hr; ++r) {
          for (int64_t j = 0; j < n; ++j) {
            if (!rows.region(bi, r, j)) continue;
            const int64_t p = rows.positions[bi * rows.ps0 + r * rows.ps1 + j];
            if (p < 0 || p >= seen) {
              bad_position = true;
              continue;
            }
            by_position[p] |= own[r * n + j];
          }
        }
      }
      for (int64_t r = 0; r < hr; ++r) {
        // the signature of each region slot of this row, then the row's anchor
        words.clear();
        members.clear();
        for (int64_t j = 0; j < n; ++j) {
          if (!rows.region(bi, r, j)) continue;
          const int64_t p = rows.positions[bi * rows.ps0 + r * rows.ps1 + j];
          words.push_back(hr > 1 ? (p >= 0 && p < seen ? by_position[p] : 0) : own[j]);
          members.push_back(j);
        }
        uint64_t anchor_bits = 0;
        const auto count = static_cast<int64_t>(words.size());
        for (int64_t s = 0; s < nsig; ++s) {
          bool bit;
          if (mean) {  // strictly more than half of the row's region tokens have the bit
            int64_t ones = 0;
            for (int64_t i = 0; i < count; ++i) ones += (words[i] >> s) & 1;
            bit = 2 * ones > count;
          } else {
            bit = anchor_p[bi * nsig + s];
          }
          anchor_bits |= bit ? uint64_t{1} << s : 0;
        }
        for (int64_t i = 0; i < count; ++i) dist[members[i]] = std::popcount(words[i] ^ anchor_bits);
        // selection rows reading this row's distances: itself, or all of them when the signatures are per slot
        for (int64_t sel = (hr > 1 ? r : 0); sel < (hr > 1 ? r + 1 : h); ++sel) {
          pick_row(rows, bi, sel, dist.data(), k, rule, out_p + (bi * h + sel) * n, cand, sorted, rest);
        }
      }
      if (hr > 1) {  // clear what this batch row set, for the next one
        for (int64_t r = 0; r < hr; ++r) {
          for (int64_t j = 0; j < n; ++j) {
            const int64_t p = rows.positions[bi * rows.ps0 + r * rows.ps1 + j];
            if (rows.region(bi, r, j) && p >= 0 && p < seen) by_position[p] = 0;
          }
        }
      }
    }
  });
  TORCH_CHECK(!bad_position, "crushkv.kvcrush_reps: a region slot's position is outside [0, seen)");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crushkv, m) {
  m.def(
      "kvcrush_reps(Tensor scores, Tensor valid, Tensor positions, Tensor start, int seen, int sink, int recent, "
      "Tensor host, Tensor order, Tensor anchor, int signature_rows, int k, int rule) -> Tensor");
}

TORCH_LIBRARY_IMPL(crushkv, CPU, m) { m.impl("kvcrush_reps", &kvcrush_reps); }
