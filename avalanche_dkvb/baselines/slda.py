"""Deep Streaming LDA (Hayes & Kanan, CVPRW 2020) on cached embeddings, in batches.

``BatchedStreamingLDAClassifier`` holds the same model as Avalanche 0.6.0's
``avalanche.training.StreamingLDA``; ``BatchedStreamingLDA`` is the Avalanche
strategy that fills it in one pass over each experience, without an optimizer.

Avalanche's strategy fits one sample at a time in a Python loop (tens of
milliseconds per sample at D = 1280). Its per-sample recursion is reproduced
here exactly, for a whole mini-batch at once, in float64:

* class means: ``muK[y] += (x - muK[y]) / (cK[y] + 1)`` is the running mean,
  kept as exact sums and counts (``means = sums / counts``).
* shared covariance: with ``n`` the number of samples absorbed before ``x``
  (over all classes and experiences) and ``mu`` the mean of the samples of
  class ``y`` absorbed before ``x`` (the zero vector if there are none)::

      Sigma <- (n * Sigma + n / (n + 1) * (x - mu)(x - mu)^T) / (n + 1)

  so ``N * Sigma_N = S_N = sum_i  i / (i + 1) * d_i d_i^T`` over the first
  ``N`` samples (``i`` = 0-based global index, ``d_i = x_i - mu_i``); the
  initial ``Sigma = ones`` gets weight 0 at the first update. For a batch,
  ``mu_i`` comes from an exclusive per-class prefix sum (stable sort by
  label, cumulative sum, segment offsets) and ``S += (w * D)^T D`` is one
  GEMM. This is not Chan et al.'s order-free pooled scatter: Avalanche's
  weights ``i / (i + 1)`` use the global count instead of the class count,
  and a class's first sample contributes ``x x^T`` (deviation from the
  zero vector), so the covariance depends on the order of the samples. It
  is, however, exactly reproducible batch by batch: the statistics depend
  on the sample order only, never on the batch size.
* ``streaming_update_sigma=False``: ``Sigma`` stays at Avalanche's initial
  value, the all-ones matrix.
* prediction: ``Lambda = pinv((1 - s) Sigma + s I)``, ``W = Lambda M^T``,
  ``scores = x W - 0.5 * diag(M W)`` (M = class means, C x D). For
  ``0 < s <= 1`` the matrix is symmetric positive definite (eigenvalues
  >= s), so its pseudo-inverse is its inverse and ``W`` is obtained by a
  Cholesky solve instead of an SVD; ``s = 0`` uses ``pinv``.

Differences from Avalanche's ``StreamingLDA``, all deliberate:

* classes without data score ``-inf`` (Avalanche scores them 0, which can
  win the argmax); before any data every class scores 0;
* statistics in float64 (Avalanche: float32), exact sums instead of
  incremental means;
* only the first epoch of an experience absorbs data (Avalanche absorbs in
  every epoch; its default is one epoch);
* no ``fit_base`` (OAS initialisation), ``save_model`` / ``load_model``: the
  state lives in the model's ``state_dict``; the model must already output
  embeddings (no ``slda_model`` / ``output_layer_name`` feature extractor).
"""

import torch
from torch import Tensor, nn


from .closed_form import ClosedFormStrategy
from .ncm import _check_batch


class BatchedStreamingLDAClassifier(nn.Module):
    """Streaming LDA with Avalanche's ``StreamingLDA`` statistics, updated
    one mini-batch at a time.

    State (buffers, so it moves with ``.to`` and lives in ``state_dict``):

    * ``sums``: (num_classes, input_size) float64, sum of the embeddings
      absorbed per class;
    * ``counts``: (num_classes,) int64, number of embeddings per class;
    * ``scatter``: (input_size, input_size) float64, ``S_N`` above
      (``num_updates * Sigma``);
    * ``num_updates``: () int64, number of embeddings absorbed (``N``).

    Scores: (N, num_classes) LDA scores ``x W - c`` as in Avalanche; classes
    with no data score ``-inf`` so they never win; if no class has data yet,
    every class scores 0.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        shrinkage_param: float = 1e-4,
        streaming_update_sigma: bool = True,
    ):
        """
        :param input_size: embedding dimension D.
        :param num_classes: total number of classes of the benchmark; fixes
            the output width.
        :param shrinkage_param: s in [0, 1]; the precision is
            ``pinv((1 - s) Sigma + s I)``.
        :param streaming_update_sigma: update the shared covariance with
            every sample; if False it stays the all-ones matrix, as in
            Avalanche.
        """
        super().__init__()
        if input_size < 1 or num_classes < 1:
            raise ValueError(
                f"input_size and num_classes must be >= 1, got "
                f"input_size={input_size}, num_classes={num_classes}"
            )
        if not 0.0 <= shrinkage_param <= 1.0:
            raise ValueError(f"shrinkage_param must lie in [0, 1], got {shrinkage_param}")
        self.input_size = input_size
        self.num_classes = num_classes
        self.shrinkage_param = float(shrinkage_param)
        self.streaming_update_sigma = bool(streaming_update_sigma)
        f64 = torch.float64
        self.register_buffer("sums", torch.zeros(num_classes, input_size, dtype=f64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("scatter", torch.zeros(input_size, input_size, dtype=f64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._readout_cache = None  # (key, W (D, C), c (C,)), see _readout

    @property
    def seen_classes(self) -> Tensor:
        """(num_classes,) bool: which classes have at least one embedding."""
        return self.counts > 0

    @property
    def means(self) -> Tensor:
        """(num_classes, input_size) float64 class means (Avalanche's
        ``muK``); zero rows for classes with no data."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    @property
    def covariance(self) -> Tensor:
        """(input_size, input_size) float64 shared covariance (Avalanche's
        ``Sigma``): ``scatter / num_updates``, or the all-ones matrix before
        any update or with ``streaming_update_sigma=False``."""
        n = int(self.num_updates)
        if not self.streaming_update_sigma or n == 0:
            return torch.ones_like(self.scatter)
        return self.scatter / n

    @property
    def precision(self) -> Tensor:
        """(input_size, input_size) float64 ``Lambda = pinv((1 - s) Sigma +
        s I)`` (computed on each access; prediction does not need it)."""
        system = self._shrunk_covariance()
        factor, info = torch.linalg.cholesky_ex(system)
        if self.shrinkage_param > 0 and int(info) == 0:
            return torch.cholesky_inverse(factor)
        return torch.linalg.pinv(system, hermitian=True)

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Absorb a batch in order, exactly as Avalanche's per-sample ``fit``
        would: x (N, input_size) float, y (N,) int in [0, num_classes)."""
        _check_batch(x, y, self.input_size, self.num_classes)
        if len(y) == 0:
            return
        x64 = x.to(torch.float64)
        if self.streaming_update_sigma:
            deviations = x64 - self._prefix_means(x64, y)
            n0 = int(self.num_updates)
            index = torch.arange(n0, n0 + len(y), dtype=torch.float64, device=x.device)
            weights = index / (index + 1)
            self.scatter.addmm_((deviations * weights.unsqueeze(1)).T, deviations)
        self.sums.index_add_(0, y, x64)
        self.counts += torch.bincount(y, minlength=self.num_classes)
        self.num_updates += len(y)

    def _prefix_means(self, x64: Tensor, y: Tensor) -> Tensor:
        """(N, D): row i is the mean of the class-``y[i]`` embeddings
        absorbed before sample i (earlier batches, then rows j < i of this
        batch with the same label); the zero vector if there are none."""
        order = torch.sort(y, stable=True).indices
        ys, xs = y[order], x64[order]
        # exclusive running sum over the sorted rows, restarted at each label
        running = torch.cat([xs.new_zeros(1, xs.shape[1]), xs.cumsum(0)])
        start = torch.searchsorted(ys, ys)  # first sorted row of each row's label
        position = torch.arange(len(ys), device=ys.device)
        prefix = running[position] - running[start] + self.sums[ys]
        count = (position - start) + self.counts[ys]
        means = prefix / count.clamp_min(1).unsqueeze(1).to(prefix.dtype)
        out = torch.empty_like(means)
        out[order] = means
        return out

    def _shrunk_covariance(self) -> Tensor:
        s = self.shrinkage_param
        system = (1 - s) * self.covariance
        system.diagonal().add_(s)
        return system

    def _readout(self) -> tuple[Tensor, Tensor]:
        """(W (D, C), c (C,)) float64 for the current statistics, cached
        until the next update (or a move / state_dict load)."""
        key = (int(self.num_updates), self.sums.device, id(self.sums), id(self.scatter))
        if self._readout_cache is not None and self._readout_cache[0] == key:
            return self._readout_cache[1], self._readout_cache[2]
        system = self._shrunk_covariance()
        means_t = self.means.T.contiguous()  # (D, C)
        factor, info = torch.linalg.cholesky_ex(system)
        if self.shrinkage_param > 0 and int(info) == 0:
            weight = torch.cholesky_solve(means_t, factor)
        else:
            weight = torch.linalg.pinv(system, hermitian=True) @ means_t
        bias = 0.5 * (means_t * weight).sum(0)
        self._readout_cache = (key, weight, bias)
        return weight, bias

    def _load_from_state_dict(self, *args, **kwargs):
        self._readout_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x (N, input_size) -> scores (N, num_classes) in x's dtype."""
        _check_batch(x, None, self.input_size, self.num_classes)
        seen = self.seen_classes
        if not seen.any():
            return x.new_zeros(x.shape[0], self.num_classes)
        weight, bias = self._readout()
        scores = x.to(torch.float64) @ weight - bias
        return scores.masked_fill(~seen, float("-inf")).to(x.dtype)


class BatchedStreamingLDA(ClosedFormStrategy):
    """Class-incremental Deep Streaming LDA on cached embeddings (no SGD),
    the same model as ``avalanche.training.StreamingLDA`` fitted a
    mini-batch at a time.

    ``model`` is a :class:`BatchedStreamingLDAClassifier`; the experience's
    inputs must already be embeddings of shape (N, input_size). Each
    mini-batch is absorbed in the update step (between ``before_update`` and
    ``after_update``); as in ``StreamingLDA``, the output used for the
    training metrics is computed before the mini-batch is absorbed
    (prequential; training cross-entropy is +inf on samples of classes not
    seen yet). Only the first epoch of an experience absorbs data. The
    covariance, like Avalanche's, depends on the order in which samples
    arrive (see the module docstring) but not on ``train_mb_size``; pass
    ``shuffle=False`` to ``train`` for a reproducible order.

    Cost per mini-batch of B samples: one B x D x D float64 GEMM for the
    covariance, plus, for the prequential training output, one D x D
    Cholesky factorisation. Memory: two D x D float64 matrices.
    """

    def __init__(
        self,
        *,
        input_size: int,
        num_classes: int,
        shrinkage_param: float = 1e-4,
        streaming_update_sigma: bool = True,
        train_mb_size: int = 1024,
        eval_mb_size: int = 1024,
        **kwargs,
    ):
        """
        :param input_size: embedding dimension D.
        :param num_classes: total number of classes of the benchmark.
        :param shrinkage_param: shrinkage s of the covariance, in [0, 1].
        :param streaming_update_sigma: update the shared covariance (True)
            or keep Avalanche's initial all-ones matrix (False).
        :param train_mb_size: mini-batch size for the statistics pass.
        :param eval_mb_size: mini-batch size for evaluation.
        :param kwargs: forwarded to ``SupervisedTemplate`` (``device``,
            ``plugins``, ``evaluator``, ``eval_every``, ``criterion``, ...).
        """
        super().__init__(
            model=BatchedStreamingLDAClassifier(
                input_size, num_classes, shrinkage_param, streaming_update_sigma
            ),
            optimizer=None,  # type: ignore[arg-type]
            train_mb_size=train_mb_size,
            eval_mb_size=eval_mb_size,
            **kwargs,
        )


__all__ = ["BatchedStreamingLDA", "BatchedStreamingLDAClassifier"]
