"""Fused EMA key updates for the CPU: one pass over the (d, C*K) EMA state per batch.

:func:`avalanche_dkvb.key_init.ema_init_keys` keeps EMA cluster sums (d, C*K), sizes (C*K,) and the
augmented keys (d+1, C*K) the search reads. Its torch path (``_torch_ema_update``) makes 5-8 passes over
that state per batch (decay, scatter, division, square norms, dead-key redraw), each through memory. These
kernels take one codebook at a time (codebooks handed out to torch's threads through ``at::parallel_for``)
and, within it, one row of K floats at a time, so each row is decayed, scattered into, divided, squared
and patched for dead keys while it is in cache:

- ``decay_sizes``: sizes = sizes * decay + alpha * counts of the batch's nearest keys; the number of
  keys whose new size is below the dead threshold (so the caller knows whether to draw replacements);
- ``update_keys``: sums = sums * decay + alpha * (heads assigned to each key, in batch order), keys =
  sums / smoothed sizes as [-2 key; |key|^2], and dead keys re-drawn from the batch.

They repeat the torch path's float32 operations one by one, rounding where torch rounds: the adds with
``alpha`` are fused multiply-adds as in torch's vectorised ``add``/``index_add_``, the square norms
accumulate with fused multiply-adds as ``addcmul_``, comparisons are against float32 thresholds, and the
sums torch reduces (sizes per codebook, square norms of re-drawn heads) are torch's own, passed in. So the
keys are the torch path's bit for bit where torch's kernels fuse (its AVX2 and AVX-512 kernels; checked
to 1e-6 by ``tests/test_native_ema.py``). Torch's pre-AVX2 ``DEFAULT`` kernels round the products
separately; there the keys differ in the last bit, enough for a near-tie in the search to go the other way.

Built on first use by :func:`avalanche_dkvb.native.build_extension`; where it cannot be built,
:func:`native_ema` returns None with a warning and the torch path runs.
"""

from __future__ import annotations

import torch

from avalanche_dkvb.native import build_extension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cmath>
#include <vector>

// Whether every one of the n indices is in [0, size): they address memory.
static bool all_below(const int64_t* index, int64_t n, int64_t size) {
  uint64_t outside = 0;
  for (int64_t i = 0; i < n; i++) outside |= (uint64_t)index[i] >= (uint64_t)size;
  return outside == 0;
}

// work(c, scratch) for every codebook c < C on torch's threads, each with its own `scratch` floats and
// `indices`. Codebooks are handed out one at a time, so a thread the OS preempts holds up no other.
template <typename Work>
static void for_each_codebook(int64_t C, int64_t scratch_size, const Work& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(C, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(scratch_size);
    std::vector<int64_t> indices(scratch_size);
    for (int64_t c = next++; c < C; c = next++) work(c, scratch.data(), indices.data());
  });
}

// One codebook: sizes (K) <- sizes * decay + alpha * counts, counts (K floats of scratch) of the nearest
// keys idx (B). Returns how many new sizes are below threshold.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static int64_t decay_codebook_sizes(float* __restrict sizes, const int64_t* __restrict idx, int64_t K, int64_t B,
                                    float decay, float alpha, float threshold, float* __restrict counts) {
  for (int64_t k = 0; k < K; k++) counts[k] = 0.0f;
  for (int64_t b = 0; b < B; b++) counts[idx[b]] += 1.0f;
  int64_t dead = 0;
  for (int64_t k = 0; k < K; k++) {
    sizes[k] = std::fma(counts[k], alpha, sizes[k] * decay);  // torch's add(alpha=) fuses
    dead += sizes[k] < threshold;
  }
  return dead;
}

// cluster_size (C*K) float32 and idx (C, B) int64, contiguous, on the CPU. Returns the number of dead keys.
int64_t decay_sizes(torch::Tensor cluster_size, torch::Tensor idx, double decay, double alpha, double threshold) {
  TORCH_CHECK(cluster_size.dtype() == torch::kFloat32 && idx.dtype() == torch::kLong, "float32 sizes, int64 idx");
  TORCH_CHECK(cluster_size.is_contiguous() && idx.is_contiguous() && cluster_size.device().is_cpu()
              && idx.device().is_cpu() && idx.dim() == 2, "contiguous CPU tensors, idx (C, B)");
  const int64_t C = idx.size(0), B = idx.size(1), K = cluster_size.numel() / C;
  TORCH_CHECK(K * C == cluster_size.numel(), "sizes are not C*K");
  const int64_t* nearest = idx.data_ptr<int64_t>();
  TORCH_CHECK(all_below(nearest, C * B, K), "idx outside [0, K)");
  float* sizes = cluster_size.data_ptr<float>();
  std::vector<int64_t> dead(C);
  for_each_codebook(C, K, [&](int64_t c, float* counts, int64_t*) {
    dead[c] = decay_codebook_sizes(sizes + c * K, nearest + c * B, K, B, (float)decay, (float)alpha,
                                   (float)threshold, counts);
  });
  int64_t total = 0;
  for (int64_t c = 0; c < C; c++) total += dead[c];
  return total;
}

struct EmaConstants {
  float decay, alpha, eps, keys_eps, threshold;
  bool reset;
};

// One codebook of K keys: sums (d rows) and keys (d+1 rows) `row` floats apart, sizes (K) already decayed,
// heads (B, d+1), idx (B), total = sum of sizes; pick (K) and head_norms (B), or null where no key is dead.
// `scale` (K floats) and `dead` (K) are scratch. One row at a time: rows are `row` floats apart, a power of
// two at K 4096, so all rows of one key share a cache set and a pass key by key would evict its own lines.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void update_codebook_keys(float* __restrict sums, float* __restrict keys, float* __restrict sizes,
                                 int64_t row, int64_t d, int64_t K, const float* __restrict heads,
                                 const int64_t* __restrict idx, int64_t B, const int64_t* __restrict pick,
                                 const float* __restrict head_norms, float total, EmaConstants e,
                                 float* __restrict scale, int64_t* __restrict dead) {
  const int64_t D1 = d + 1;
  const float denominator = total + e.keys_eps;
  for (int64_t k = 0; k < K; k++) scale[k] = (sizes[k] + e.eps) / denominator * total * -0.5f;
  int64_t dead_count = 0;
  if (pick != nullptr) {
    for (int64_t k = 0; k < K; k++) {
      dead[dead_count] = k;
      dead_count += sizes[k] < e.threshold;
    }
  }
  float* __restrict norms = keys + d * row;
  for (int64_t j = 0; j < d; j++) {
    float* __restrict s = sums + j * row;
    float* __restrict v = keys + j * row;  // -2 * mean
    for (int64_t k = 0; k < K; k++) s[k] *= e.decay;
    for (int64_t b = 0; b < B; b++) s[idx[b]] = std::fma(heads[b * D1 + j], e.alpha, s[idx[b]]);  // index_add_
    for (int64_t k = 0; k < K; k++) v[k] = s[k] / scale[k];
    if (j == 0) {
      for (int64_t k = 0; k < K; k++) norms[k] = v[k] * v[k];
    } else {
      for (int64_t k = 0; k < K; k++) norms[k] = std::fma(v[k], v[k], norms[k]);  // addcmul_ fuses
    }
    for (int64_t i = 0; i < dead_count; i++) {
      const int64_t k = dead[i];
      const float fresh = heads[pick[k] * D1 + j];
      v[k] = fresh * -2.0f;
      if (e.reset) s[k] = fresh;
    }
  }
  for (int64_t k = 0; k < K; k++) norms[k] *= 0.25f;
  for (int64_t i = 0; i < dead_count; i++) {
    norms[dead[i]] = head_norms[pick[dead[i]]];
    if (e.reset) sizes[dead[i]] = 1.0f;
  }
}

// embed_sum (d, C*K), cluster_size (C*K) after decay_sizes, keys_aug (d+1, C*K), heads_aug (C, B, d+1),
// idx (C, B), total (C,) the sums of the sizes per codebook; where keys are dead, pick (C*K) in [0, B)
// and head_norms (C, B), else empty tensors. All contiguous float32 (int64 idx and pick) on the CPU.
void update_keys(torch::Tensor embed_sum, torch::Tensor cluster_size, torch::Tensor keys_aug,
                 torch::Tensor heads_aug, torch::Tensor idx, torch::Tensor total, torch::Tensor pick,
                 torch::Tensor head_norms, double decay, double alpha, double eps, double keys_eps,
                 double threshold, bool reset) {
  for (const auto& t : {embed_sum, cluster_size, keys_aug, heads_aug, total}) {
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), "contiguous CPU float32");
  }
  TORCH_CHECK(idx.dtype() == torch::kLong && idx.is_contiguous() && idx.device().is_cpu() && heads_aug.dim() == 3
              && embed_sum.dim() == 2 && keys_aug.dim() == 2, "contiguous CPU int64 idx; heads (C, B, d+1)");
  const int64_t C = heads_aug.size(0), B = heads_aug.size(1), D1 = heads_aug.size(2), d = D1 - 1;
  const int64_t M = cluster_size.numel(), K = M / C;
  TORCH_CHECK(K * C == M && embed_sum.size(0) == d && embed_sum.size(1) == M && keys_aug.size(0) == D1
              && keys_aug.size(1) == M && idx.numel() == C * B && total.numel() == C, "shapes do not match");
  const int64_t* nearest = idx.data_ptr<int64_t>();
  TORCH_CHECK(all_below(nearest, C * B, K), "idx outside [0, K)");
  const bool redraw = pick.numel() > 0;
  if (redraw) {
    TORCH_CHECK(pick.dtype() == torch::kLong && pick.is_contiguous() && pick.device().is_cpu() && pick.numel() == M,
                "pick is (C*K) int64");
    TORCH_CHECK(all_below(pick.data_ptr<int64_t>(), M, B), "pick outside [0, B)");
    TORCH_CHECK(head_norms.dtype() == torch::kFloat32 && head_norms.is_contiguous() && head_norms.device().is_cpu()
                && head_norms.numel() == C * B, "head_norms is (C, B) float32");
  }
  const EmaConstants e{(float)decay, (float)alpha, (float)eps, (float)keys_eps, (float)threshold, reset};
  float* sums = embed_sum.data_ptr<float>();
  float* keys = keys_aug.data_ptr<float>();
  float* sizes = cluster_size.data_ptr<float>();
  const float* heads = heads_aug.data_ptr<float>();
  const float* totals = total.data_ptr<float>();
  const int64_t* picks = redraw ? pick.data_ptr<int64_t>() : nullptr;
  const float* norms = redraw ? head_norms.data_ptr<float>() : nullptr;
  for_each_codebook(C, K, [&](int64_t c, float* scale, int64_t* dead) {
    update_codebook_keys(sums + c * K, keys + c * K, sizes + c * K, M, d, K, heads + c * B * D1, nearest + c * B, B,
                         redraw ? picks + c * K : nullptr, redraw ? norms + c * B : nullptr, totals[c], e, scale,
                         dead);
  });
}
"""


def native_ema():
    """The compiled module with ``decay_sizes`` and ``update_keys`` (CPU, float32; see the C++ source for
    the shapes), or None where it cannot be built (warned once)."""
    return build_extension("avalanche_dkvb_ema_v3", _SOURCE, ("decay_sizes", "update_keys"),
                           "updating the EMA keys with torch operations instead (same keys, slower)")


def can_use_native_ema(embed_sum: torch.Tensor) -> bool:
    """Whether :func:`native_ema` applies to the EMA state ``embed_sum`` (d, C*K): CPU, float32 (building
    it if needed)."""
    return embed_sum.device.type == "cpu" and embed_sum.dtype == torch.float32 and native_ema() is not None
