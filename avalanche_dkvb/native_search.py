"""A fused nearest-key search for the CPU: scores and argmin in one pass, never stored.

``search_keys`` (in :mod:`avalanche_dkvb.bottleneck`) computes the same scores, ``|key|^2 - 2 z.key``,
as batched matrix products followed by an argmin; with an inner size of d+1 = 15 the products run far
below the machine's peak and every score goes through memory twice. This kernel keeps a block of 8 heads
and 16 keys in registers, accumulates their scores over the d+1 rows of the augmented keys and folds
them into a running (score, index) minimum per head and lane, so a score is never written anywhere.

It is C++ (GCC vector extensions, one clone per x86-64 level chosen at run time), built on first use
by :func:`avalanche_dkvb.native.build_extension` (about 40 s once per machine and torch version). Where
it cannot be built (no C++ compiler or ninja) :func:`native_search` returns None with a warning, and
``search_keys`` uses the matrix products.

The kernel's 16-lane vectors are one AVX-512 register; without AVX-512 they spill, and on an AVX2 EPYC
it searched a (256 codebooks, 256 heads, 4096 keys) block in 3.13 s against 0.69 s for the matrix
products, so :func:`can_use_native_search` takes it only where torch reports AVX-512.

Scores are summed in a different order from the matrix product's, so an exact near-tie (two keys
within float32 rounding of each other) can go the other way; the chosen key is always a nearest key
to float32 precision (``tests/test_native_search.py``). Ties in the kernel's own scores go to the
lowest index, as ``argmin``.
"""

from __future__ import annotations

import torch

from avalanche_dkvb.native import build_extension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <limits>

typedef float lanes16 __attribute__((vector_size(64)));

// One block of heads of one codebook: heads (n, D1) with 1 in column D1-1; keys (D1, K) with rows
// `row` floats apart: -2 key^T and |key|^2 (inf masks a key). Writes each head's first minimum's index.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void search_block(const float* heads, const float* keys, int64_t row, int64_t D1, int64_t K, int64_t n,
                         int64_t* out) {
  constexpr int H = 8;  // heads sharing each load of 16 keys
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t K16 = K - K % 16;
  lanes16 lane;
  for (int l = 0; l < 16; l++) lane[l] = (float)l;
  for (int64_t h0 = 0; h0 < n; h0 += H) {
    const int64_t m = n - h0 < H ? n - h0 : H;
    const float* head[H];
    for (int i = 0; i < H; i++) head[i] = heads + (h0 + (i < m ? i : 0)) * D1;
    lanes16 best[H], best_index[H];  // indices held as floats: exact below 2^24
    for (int i = 0; i < H; i++) {
      for (int l = 0; l < 16; l++) { best[i][l] = inf; best_index[i][l] = 0.0f; }
    }
    for (int64_t k0 = 0; k0 < K16; k0 += 16) {
      lanes16 score[H];
      lanes16 norm;
      std::memcpy(&norm, keys + (D1 - 1) * row + k0, sizeof norm);
      for (int i = 0; i < H; i++) score[i] = norm;
      for (int64_t j = 0; j < D1 - 1; j++) {
        lanes16 key;
        std::memcpy(&key, keys + j * row + k0, sizeof key);
        for (int i = 0; i < H; i++) score[i] += head[i][j] * key;
      }
      const lanes16 index = lane + (float)k0;
      for (int i = 0; i < H; i++) {
        const auto lower = score[i] < best[i];
        best[i] = lower ? score[i] : best[i];
        best_index[i] = lower ? index : best_index[i];
      }
    }
    for (int64_t i = 0; i < m; i++) {
      float value = best[i][0], at = best_index[i][0];
      for (int l = 1; l < 16; l++) {
        if (best[i][l] < value || (best[i][l] == value && best_index[i][l] < at)) {
          value = best[i][l];
          at = best_index[i][l];
        }
      }
      for (int64_t k = K16; k < K; k++) {  // the last K % 16 keys, one at a time
        float s = keys[(D1 - 1) * row + k];
        for (int64_t j = 0; j < D1 - 1; j++) s += head[i][j] * keys[j * row + k];
        if (s < value) { value = s; at = (float)k; }
      }
      out[h0 + i] = (int64_t)at;
    }
  }
}

// heads_aug (C, B, d+1) contiguous, keys_aug (C, d+1, K) with unit stride along K, float32 -> (C, B) int64.
torch::Tensor nearest_keys(torch::Tensor heads_aug, torch::Tensor keys_aug) {
  TORCH_CHECK(heads_aug.dtype() == torch::kFloat32 && keys_aug.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(heads_aug.is_contiguous() && keys_aug.stride(2) == 1, "contiguous heads, keys unit-strided along K");
  const int64_t C = heads_aug.size(0), B = heads_aug.size(1), D1 = heads_aug.size(2), K = keys_aug.size(2);
  TORCH_CHECK(keys_aug.size(0) == C && keys_aug.size(1) == D1, "heads and keys do not match");
  TORCH_CHECK(K < (int64_t(1) << 24), "at most 2^24 keys");
  auto out = torch::empty({C, B}, heads_aug.options().dtype(torch::kLong));
  const float* heads = heads_aug.data_ptr<float>();
  const float* keys = keys_aug.data_ptr<float>();
  int64_t* idx = out.data_ptr<int64_t>();
  const int64_t block = 64;  // heads per task
  const int64_t blocks = (B + block - 1) / block;
  at::parallel_for(0, C * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; task++) {
      const int64_t c = task / blocks, b0 = (task % blocks) * block;
      search_block(heads + (c * B + b0) * D1, keys + c * keys_aug.stride(0), keys_aug.stride(1), D1, K,
                   std::min(block, B - b0), idx + c * B + b0);
    }
  });
  return out;
}
"""


def native_search():
    """The compiled kernel's ``nearest_keys(heads_aug, keys_aug)`` (CPU, float32; heads contiguous,
    keys unit-strided along K: (C, B, d+1), (C, d+1, K) -> (C, B) int64), or None where it cannot be
    built (warned once)."""
    module = build_extension("avalanche_dkvb_nearest_keys_v2", _SOURCE, ("nearest_keys",),
                             "searching with matrix products instead (same keys, slower)")
    return None if module is None else module.nearest_keys


def can_use_native_search(heads_aug: torch.Tensor, keys_aug: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`native_search` applies and pays: top-1, CPU with AVX-512, float32, fewer than 2^24
    keys (building it if needed)."""
    return (top_k == 1 and heads_aug.device.type == "cpu" and keys_aug.device.type == "cpu"
            and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and heads_aug.dtype == torch.float32 and keys_aug.dtype == torch.float32
            and keys_aug.stride(2) == 1 and keys_aug.shape[2] < 2**24 and native_search() is not None)
