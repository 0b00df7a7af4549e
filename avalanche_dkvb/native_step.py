"""The fast path's step as three C++ CPU kernels: gather-mean, cross-entropy with its gradient, scatter.

:mod:`avalanche_dkvb.fast_path` computes one training step of the values from the rows each sample
selects. In torch that is a gather, a mean, a softmax, a one-hot target, a subtraction, a division and an
``index_add_``: each a separate pass with its own dispatch and temporaries, on tensors as small as
(256, 10), so the overheads exceed the arithmetic. These kernels do each stage in one pass:

    gather_mean(values (..., V), rows (b, J), scale)          -> logits (b, V) = scale * mean_j values[rows[:, j]]
    cross_entropy(logits (b, V), labels (b,), smoothing)      -> (loss (), dLoss/dlogits (b, V))
    scatter_add(values (..., V), rows (b, J), gradient (b, V), step, group) values[rows[i, j]] += step * gradient[i]

with rows numbered as in the (R, V) view of values (e.g. the (C, K, V) table itself).

Rows are read sample-major as the lookup returns them (no transpose). Sums over the J rows of a sample
and the loss are accumulated in float64, and the cross-entropy's exponentials are float64 too, 8 at a time
(``exp_nonpositive``; on 5.6 million logits its loss and gradient were those of ``std::exp``, bit for bit);
the update ``step * gradient[i]`` is rounded to float32 once
and added to each selected row in the order (codebook, column, sample), the order in which the torch
step's ``index_add_`` adds it. ``scatter_add`` runs groups of ``group`` consecutive columns in parallel
(``at::parallel_for``): a group must hold the columns of one codebook (top-k), whose rows no other group
selects. Rows of at most 16 floats (V <= 16; for the scatter also top-1) go through kernels with V fixed
at compile time, whose sums and updates stay in vector registers: they go sample by sample, with the
same sums and the same order of additions per row. Built by :func:`avalanche_dkvb.native.build_extension`;
None where it cannot be.

``collapse_to_huge_pages(values)`` asks Linux (6.1 or later) to back the value table with 2 MiB pages, its
contents kept: the rows a step selects are scattered over the whole table, and with 4 KiB pages many of them
also cost a page walk. The first request copies the table (3 s for 839 MB, 200 classes); later ones find it
done and cost nothing.
"""

from __future__ import annotations

import torch

from avalanche_dkvb.native import build_extension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#ifdef __linux__
#include <sys/mman.h>
#endif

constexpr int64_t AHEAD = 24;  // samples between a row's prefetch and its use: rows are random in a large table

// Every cache line of a row of V floats (one that starts mid-line ends on one more line). Prefetching only a long
// row's first and last lines, as this once did, left the lines between to the hardware: at V = 200 on rows spread
// over all keys, the gather then took 2x as long and the scatter 1.4x.
static inline void prefetch_row(const float* row, int64_t V) {
  const char* bytes = (const char*)row;
  for (int64_t byte = 0; byte < V * 4; byte += 64) __builtin_prefetch(bytes + byte);
  __builtin_prefetch(bytes + V * 4 - 1);
}

// Each kernel's work over one thread's range is a target_clones function of its own, which the at::parallel_for
// lambda calls: code written inside the lambda can end up compiled once, for baseline x86-64, whatever clone
// calls it (the int32 general gather's was; its int64 twin had been inlined into each clone).
template <typename Row>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void gather_mean_rows_range(const float* values, const Row* rows, int64_t B, int64_t J, int64_t V,
                                   double scale, float* out, int64_t begin, int64_t end) {
  std::vector<double> acc((end - begin) * V, 0.0);
  for (int64_t j = 0; j < J; j++) {  // one codebook's slice of the values at a time
    for (int64_t i = begin; i < end; i++) {
      if (i + AHEAD < end) prefetch_row(values + (int64_t)rows[(i + AHEAD) * J + j] * V, V);
      const float* row = values + (int64_t)rows[i * J + j] * V;
      double* a = acc.data() + (i - begin) * V;
      for (int64_t v = 0; v < V; v++) a[v] += row[v];
    }
  }
  for (int64_t i = begin; i < end; i++) {
    for (int64_t v = 0; v < V; v++) out[i * V + v] = (float)(acc[(i - begin) * V + v] / J) * (float)scale;
  }
}

template <typename Row>
static void gather_mean_rows(const float* values, const Row* rows, int64_t B, int64_t J, int64_t V, double scale,
                             float* out) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    gather_mean_rows_range(values, rows, B, J, V, scale, out, begin, end);
  });
}

template <typename Row>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void scatter_rows_range(float* values, const Row* rows, const float* update, int64_t B, int64_t J,
                               int64_t V, int64_t group, int64_t begin, int64_t end) {
  for (int64_t j = begin * group; j < end * group; j++) {
    for (int64_t i = 0; i < B; i++) {
      if (i + AHEAD < B) prefetch_row(values + (int64_t)rows[(i + AHEAD) * J + j] * V, V);
      float* row = values + (int64_t)rows[i * J + j] * V;
      const float* u = update + i * V;
      for (int64_t v = 0; v < V; v++) row[v] += u[v];
    }
  }
}

template <typename Row>
static void scatter_rows(float* values, const Row* rows, const float* gradient, float step, int64_t B, int64_t J,
                         int64_t V, int64_t group) {
  std::vector<float> update(B * V);
  for (int64_t n = 0; n < B * V; n++) update[n] = gradient[n] * step;  // rounded once, as torch's gradient * step
  at::parallel_for(0, J / group, 1, [&](int64_t begin, int64_t end) {
    scatter_rows_range(values, rows, update.data(), B, J, V, group, begin, end);
  });
}

// Value sizes up to MAX_FIXED_V (the class counts of most streams: 10, 2 per experience, ...) get kernels with V known
// at compile time, so a row is a few vector loads and a sample's sums or update stay in registers.
constexpr int MAX_FIXED_V = 16;
// Row positions between a row's prefetch and its use there: a short row is a few cycles of work, so the distance
// must be longer to cover a miss (on rows spread over all keys, 96-160 made the gather about 2x faster than 24).
constexpr int64_t AHEAD_ROWS = 128;
typedef float floats8 __attribute__((vector_size(32)));
typedef double doubles8 __attribute__((vector_size(64)));

// gather_mean_rows for V == VV, sample-major: each sample's J rows are summed in registers, in column order (as
// gather_mean_rows sums them), and the row AHEAD_ROWS positions later is prefetched.
template <int VV, typename Row>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void gather_mean_fixed_range(const float* values, const Row* rows, int64_t B, int64_t J, double scale,
                                    float* out, int64_t begin, int64_t end) {
  constexpr int CHUNKS = VV / 8, TAIL = VV % 8;
  const int64_t last = end * J;
  for (int64_t i = begin; i < end; i++) {
    doubles8 sums[CHUNKS > 0 ? CHUNKS : 1] = {};
    double tail_sums[TAIL > 0 ? TAIL : 1] = {};
    for (int64_t p = i * J; p < (i + 1) * J; p++) {
      if (p + AHEAD_ROWS < last) prefetch_row(values + (int64_t)rows[p + AHEAD_ROWS] * VV, VV);
      const float* row = values + (int64_t)rows[p] * VV;
      for (int c = 0; c < CHUNKS; c++) {
        doubles8 x;  // element by element: GCC 12 makes this one vcvtps2pd, __builtin_convertvector four instructions
        for (int v = 0; v < 8; v++) x[v] = row[8 * c + v];
        sums[c] += x;
      }
      for (int v = 0; v < TAIL; v++) tail_sums[v] += row[8 * CHUNKS + v];
    }
    for (int c = 0; c < CHUNKS; c++)
      for (int v = 0; v < 8; v++) out[i * VV + 8 * c + v] = (float)(sums[c][v] / J) * (float)scale;
    for (int v = 0; v < TAIL; v++) out[i * VV + 8 * CHUNKS + v] = (float)(tail_sums[v] / J) * (float)scale;
  }
}

template <int VV, typename Row>
static void gather_mean_fixed(const float* values, const Row* rows, int64_t B, int64_t J, double scale, float* out) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    gather_mean_fixed_range<VV>(values, rows, B, J, scale, out, begin, end);
  });
}

// scatter_rows for V == VV and one column per codebook (top-1): each thread takes a range of columns and adds
// sample by sample, the sample's update held in registers. A row belongs to one column, so it still receives
// its updates in sample order, as from scatter_rows and index_add_. A tail (VV % 8 floats) is added on its own
// (GCC makes a short vector of it): loading and storing it as the row's last 8 floats, overlapping the
// others, doubles the stores that cross a cache line and made the step's scatter 10 % slower. The rows
// prefetched are those of a later sample, the first one at least AHEAD_ROWS positions on.
template <int VV, typename Row>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void scatter_fixed_range(float* values, const Row* rows, const float* gradient, float step, int64_t B,
                                int64_t J, int64_t first, int64_t end) {
  constexpr int CHUNKS = VV / 8, TAIL = VV % 8;
  const int64_t samples_ahead = (AHEAD_ROWS + (end - first) - 1) / (end - first);
  for (int64_t i = 0; i < B; i++) {
    floats8 u[CHUNKS > 0 ? CHUNKS : 1];
    float tail_u[TAIL > 0 ? TAIL : 1];
    const float* g = gradient + i * VV;  // the update rounded once, as torch's gradient * step
    for (int c = 0; c < CHUNKS; c++)
      for (int v = 0; v < 8; v++) u[c][v] = g[8 * c + v] * step;
    for (int v = 0; v < TAIL; v++) tail_u[v] = g[8 * CHUNKS + v] * step;
    const Row* ahead = i + samples_ahead < B ? rows + (i + samples_ahead) * J : nullptr;
    for (int64_t j = first; j < end; j++) {
      if (ahead != nullptr) prefetch_row(values + (int64_t)ahead[j] * VV, VV);
      float* row = values + (int64_t)rows[i * J + j] * VV;
      for (int c = 0; c < CHUNKS; c++) {
        floats8 x;
        std::memcpy(&x, row + 8 * c, sizeof x);
        x += u[c];
        std::memcpy(row + 8 * c, &x, sizeof x);
      }
      for (int v = 0; v < TAIL; v++) row[8 * CHUNKS + v] += tail_u[v];
    }
  }
}

template <int VV, typename Row>
static void scatter_fixed(float* values, const Row* rows, const float* gradient, float step, int64_t B, int64_t J) {
  at::parallel_for(0, J, 1, [&](int64_t begin, int64_t end) {
    scatter_fixed_range<VV>(values, rows, gradient, step, B, J, begin, end);
  });
}

// The kernels for values of V floats a row: the fixed-size ones where V <= MAX_FIXED_V (scatter: also top-1 only),
// else the general ones, which go codebook-major (for large rows no faster order was found: see the README).
template <typename Row, int VV = 1>
static void gather_mean_any(const float* values, const Row* rows, int64_t B, int64_t J, int64_t V, double scale,
                            float* out) {
  if constexpr (VV > MAX_FIXED_V) {
    gather_mean_rows(values, rows, B, J, V, scale, out);
  } else if (V == VV) {
    gather_mean_fixed<VV>(values, rows, B, J, scale, out);
  } else {
    gather_mean_any<Row, VV + 1>(values, rows, B, J, V, scale, out);
  }
}

template <typename Row, int VV = 1>
static void scatter_any(float* values, const Row* rows, const float* gradient, float step, int64_t B, int64_t J,
                        int64_t V, int64_t group) {
  if constexpr (VV > MAX_FIXED_V) {
    scatter_rows(values, rows, gradient, step, B, J, V, group);
  } else if (V == VV && group == 1) {
    scatter_fixed<VV>(values, rows, gradient, step, B, J);
  } else {
    scatter_any<Row, VV + 1>(values, rows, gradient, step, B, J, V, group);
  }
}

static void check_rows(const torch::Tensor& values, const torch::Tensor& rows) {
  TORCH_CHECK(values.dtype() == torch::kFloat32 && values.is_contiguous() && values.dim() >= 2,
              "values must be a contiguous (..., V) float32 tensor: its rows are its last dimension");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous()
              && (rows.dtype() == torch::kInt32 || rows.dtype() == torch::kLong),
              "rows must be a contiguous (b, J) int32 or int64 tensor");
  TORCH_CHECK(rows.size(1) > 0, "rows must have at least one column");
}

// values (..., V) (rows of V floats, e.g. the (C, K, V) table itself), rows (b, J) -> (b, V): scale * the mean of
// each sample's J rows.
torch::Tensor gather_mean(torch::Tensor values, torch::Tensor rows, double scale) {
  check_rows(values, rows);
  const int64_t B = rows.size(0), J = rows.size(1), V = values.size(-1);
  auto out = torch::empty({B, V}, values.options());
  if (rows.dtype() == torch::kInt32) {
    gather_mean_any(values.data_ptr<float>(), rows.data_ptr<int32_t>(), B, J, V, scale, out.data_ptr<float>());
  } else {
    gather_mean_any(values.data_ptr<float>(), rows.data_ptr<int64_t>(), B, J, V, scale, out.data_ptr<float>());
  }
  return out;
}

typedef int64_t longs8 __attribute__((vector_size(64)));

// exp(x) of 8 values x <= 0 at once: 2^n exp(r) with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, the
// first one times n exact), exp(r) by its Taylor series to degree 13 (|r| <= ln(2) / 2: truncated below 1e-17
// relative; the rest of the error is the series' rounding). x is clamped at -708, where 2^n would leave the normal
// doubles: exp(-708) ~ 3e-308 is lost against a softmax's norm (>= 1) and is 0 in float32, as exp(x) is.
static inline __attribute__((always_inline)) doubles8 exp_nonpositive(doubles8 x) {
  x = x < -708.0 ? doubles8{} - 708.0 : x;
  const doubles8 shifter = doubles8{} + 0x1.8p52;  // adding it rounds to an integer (round to nearest)
  const doubles8 n = (x * 1.44269504088896338700e+00 + shifter) - shifter;
  const doubles8 r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  constexpr double inverse_factorials[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                             1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800,
                                             1.0 / 479001600, 1.0 / 6227020800};
  doubles8 p = doubles8{} + inverse_factorials[13];
  for (int k = 12; k >= 0; k--) p = p * r + inverse_factorials[k];
  const longs8 bits = (__builtin_convertvector(n, longs8) + 1023) << 52;
  doubles8 power;
  std::memcpy(&power, &bits, sizeof power);
  return p * power;
}

// The arithmetic of cross_entropy: the summed loss of the b samples, and their gradient into g (b, V). The samples go
// 8 at a time, one to a vector lane, so each one's chains (its maximum, its exponentials' sum and its loss, class
// by class in class order) run beside 7 others instead of waiting on their own latency. The clones keep every
// multiplication and addition apart (no fused multiply-add), so each computes the same bits.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("fp-contract=off")))
static double cross_entropy_rows(const float* x, const int64_t* y, int64_t B, int64_t V, float on, float off,
                                 float* g) {
  const float hit = on + off;  // the smoothed target of the label's class; the others' is 0 + off = off
  const float divisor = (float)B;
  // lane k of a class's vector: sample first + k; kept as doubles (a std::vector of doubles8 need not be aligned)
  std::vector<double> logit_lanes(8 * V), exp_lanes(8 * V);
  const auto load = [](const std::vector<double>& lanes, int64_t v) {
    doubles8 out;
    std::memcpy(&out, lanes.data() + 8 * v, sizeof out);
    return out;
  };
  double total = 0.0;
  for (int64_t first = 0; first < B; first += 8) {
    const int lanes = (int)std::min<int64_t>(8, B - first);
    longs8 labels = {};
    for (int k = 0; k < 8; k++) labels[k] = k < lanes ? y[first + k] : -1;
    for (int64_t v = 0; v < V; v++)
      for (int k = 0; k < 8; k++) logit_lanes[8 * v + k] = k < lanes ? x[(first + k) * V + v] : 0.0;
    doubles8 top = load(logit_lanes, 0);
    for (int64_t v = 1; v < V; v++) {
      const doubles8 logit = load(logit_lanes, v);
      top = logit > top ? logit : top;
    }
    doubles8 norm = {};
    for (int64_t v = 0; v < V; v++) {
      const doubles8 e = exp_nonpositive(load(logit_lanes, v) - top);
      std::memcpy(exp_lanes.data() + 8 * v, &e, sizeof e);
      norm += e;
    }
    doubles8 log_norm;
    for (int k = 0; k < 8; k++) log_norm[k] = top[k] + std::log(norm[k]);
    doubles8 loss = {};
    for (int64_t v = 0; v < V; v++) {
      const doubles8 target = labels == v ? doubles8{} + (double)hit : doubles8{} + (double)off;
      loss -= target * (load(logit_lanes, v) - log_norm);
      const doubles8 softmax = load(exp_lanes, v) / norm;
      floats8 softmax32, target32;  // the target in float32 is hit or off again, exactly
      for (int k = 0; k < 8; k++) softmax32[k] = (float)softmax[k], target32[k] = (float)target[k];
      const floats8 gradient = (softmax32 - target32) / divisor;
      for (int k = 0; k < lanes; k++) g[(first + k) * V + v] = gradient[k];
    }
    for (int k = 0; k < lanes; k++) total += loss[k];  // in sample order
  }
  return total;
}

// Mean cross-entropy of logits (b, V) against labels (b,) with label smoothing s (targets (1-s) onehot + s/V),
// and its gradient (softmax - target) / b, computed 8 samples at a time by cross_entropy_rows.
std::vector<torch::Tensor> cross_entropy(torch::Tensor logits, torch::Tensor labels, double smoothing) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.is_contiguous() && logits.dim() == 2,
              "logits must be a contiguous (b, V) float32 tensor");
  TORCH_CHECK(labels.dtype() == torch::kLong && labels.dim() == 1 && labels.size(0) == logits.size(0),
              "labels must be (b,) int64, one per row of logits");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto grad = torch::empty_like(logits);
  const auto labels_contiguous = labels.contiguous();
  const float* x = logits.data_ptr<float>();
  const int64_t* y = labels_contiguous.data_ptr<int64_t>();
  float* g = grad.data_ptr<float>();
  const float on = (float)(1.0 - smoothing), off = (float)(smoothing / V);
  for (int64_t i = 0; i < B; i++)
    TORCH_CHECK(y[i] >= 0 && y[i] < V, "label ", y[i], " out of range for ", V, " classes");
  const double total = cross_entropy_rows(x, y, B, V, on, off, g);
  return {torch::full({}, total / B, logits.options()), grad};
}

// values[rows[i, j]] += step * gradient[i] for every i, j, in place (values (..., V), rows of V floats); groups of
// `group` columns in parallel.
void scatter_add(torch::Tensor values, torch::Tensor rows, torch::Tensor gradient, double step, int64_t group) {
  check_rows(values, rows);
  const int64_t B = rows.size(0), J = rows.size(1), V = values.size(-1);
  TORCH_CHECK(gradient.dtype() == torch::kFloat32 && gradient.is_contiguous() && gradient.size(0) == B &&
              gradient.size(1) == V, "gradient must be a contiguous (b, V) float32 tensor");
  TORCH_CHECK(group > 0 && J % group == 0, "group must divide the number of columns");
  const float* g = gradient.data_ptr<float>();
  if (rows.dtype() == torch::kInt32) {
    scatter_any(values.data_ptr<float>(), rows.data_ptr<int32_t>(), g, (float)step, B, J, V, group);
  } else {
    scatter_any(values.data_ptr<float>(), rows.data_ptr<int64_t>(), g, (float)step, B, J, V, group);
  }
}

// Backs the 2 MiB-aligned part of a contiguous CPU tensor's memory with huge pages now (MADV_COLLAPSE: the pages
// are copied, the contents and addresses stay), so the random rows of a step cost no page walks: with 4 KiB pages
// the table's 10,000 to 200,000 pages overflow the TLB. Returns the bytes collapsed: 0 where there is no aligned
// 2 MiB inside the tensor, or the kernel refuses (before Linux 6.1, huge pages off, no free 2 MiB of memory),
// which costs only the speed.
int64_t collapse_to_huge_pages(torch::Tensor tensor) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous(), "the tensor must be contiguous and on the CPU");
#ifdef __linux__
  constexpr int COLLAPSE = 25;  // MADV_COLLAPSE, which older C library headers do not name
  constexpr uintptr_t HUGE_PAGE = 1 << 21;
  const uintptr_t start = (uintptr_t)tensor.data_ptr(), end = start + tensor.numel() * tensor.element_size();
  const uintptr_t first = (start + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE, last = end / HUGE_PAGE * HUGE_PAGE;
  if (last > first && madvise((void*)first, last - first, COLLAPSE) == 0) return (int64_t)(last - first);
#endif
  return 0;
}
"""


def native_step():
    """The compiled module with ``gather_mean``, ``cross_entropy``, ``scatter_add`` and
    ``collapse_to_huge_pages`` (see the module docstring), or None where it cannot be built (warned once)."""
    return build_extension("avalanche_dkvb_fast_step_v15", _SOURCE,
                           ("gather_mean", "cross_entropy", "scatter_add", "collapse_to_huge_pages"),
                           "the fast path uses its torch kernels instead (same results, slower)")


def can_use_native_step(values: torch.Tensor) -> bool:
    """Whether the kernels apply to ``values`` (CPU, float32), building them if needed."""
    return values.device.type == "cpu" and values.dtype == torch.float32 and native_step() is not None
