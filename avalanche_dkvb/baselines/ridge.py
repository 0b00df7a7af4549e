"""Random projection + ridge regression baseline on cached embeddings.

RanPAC without its first-session adapter (McDonnell et al., NeurIPS 2023):
a fixed Gaussian projection W (D x M) and a ReLU give features
h = relu(x @ W); the sufficient statistics G = sum h h^T (M x M) and
Q = sum h onehot(y)^T (M x C) are accumulated exactly over every experience,
and the readout is (G + lambda I)^{-1} Q, so logits = h @ readout.
``RandomProjectionRidgeClassifier`` holds the statistics;
``RandomProjectionRidge`` is the Avalanche strategy that fills them in one
pass over each experience and re-solves the readout after it.
"""

from typing import Optional

import torch
from torch import Tensor, nn


from .closed_form import ClosedFormStrategy
from .ncm import _check_batch

RIDGE_GRID = tuple(10.0**k for k in range(8, -9, -1))
"""Candidate lambdas for automatic selection (RanPAC's 1e-8..1e8), strongest
first so that ties go to the strongest regularisation."""


class RandomProjectionRidgeClassifier(nn.Module):
    """Ridge-regression readout on fixed random ReLU features.

    Buffers (in ``state_dict``; statistics in float64):

    * ``projection``: (in_features, M) float64, N(0, 1) entries drawn from
      ``seed``; ``None`` when ``projection_dim == 0`` (then h = x, M = D);
    * ``gram`` G: (M, M), ``moment`` Q: (M, num_classes), sums over every
      absorbed sample; ``counts``: (num_classes,) int64 samples per class;
    * ``readout``: (M, num_classes) = (G + ridge I)^{-1} Q as of the last
      :meth:`fit`; ``fitted_classes``: (num_classes,) bool, classes with data
      at that fit; ``ridge``: the lambda used by that fit (NaN before);
    * automatic lambda only: ``holdout_gram`` / ``holdout_moment``, the same
      sums restricted to the held-out samples.

    Invariants: G, Q and counts are exact sums, so for a fixed lambda the
    readout depends only on the multiset of samples absorbed, not on their
    batching or order. :meth:`forward` uses the readout of the last
    :meth:`fit`; samples absorbed since then count only after the next fit.

    Automatic lambda (``ridge=None``), as RanPAC: every ``holdout_every``-th
    sample absorbed (samples 0, k, 2k, ... in absorption order) goes to a
    held-out split of the data seen so far; each lambda of ``RIDGE_GRID`` is
    fitted on the other samples and scored by its exact mean-squared error on
    the held-out one-hot targets (computed from the held-out G and Q, so no
    sample is stored); the best lambda is then refitted on all data. Only
    data already absorbed is used; the choice depends on absorption order.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        projection_dim: int = 5000,
        ridge: Optional[float] = None,
        holdout_every: int = 5,
        seed: int = 0,
    ):
        """
        :param in_features: embedding dimension D.
        :param num_classes: total number of classes of the benchmark; fixes
            the output width.
        :param projection_dim: M, width of the random ReLU features; 0 means
            no projection (plain ridge regression on the embeddings).
        :param ridge: fixed lambda > 0, or None to pick it from
            ``RIDGE_GRID`` on a held-out split at every :meth:`fit`.
        :param holdout_every: with ``ridge=None``, hold out one sample in
            this many (>= 2).
        :param seed: seed of the random projection.
        """
        super().__init__()
        if in_features < 1 or num_classes < 1 or projection_dim < 0:
            raise ValueError(
                f"need in_features >= 1, num_classes >= 1, projection_dim >= 0, "
                f"got in_features={in_features}, num_classes={num_classes}, "
                f"projection_dim={projection_dim}"
            )
        if ridge is not None and not ridge > 0:
            raise ValueError(f"ridge must be > 0 or None (automatic), got {ridge}")
        if ridge is None and holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.auto_ridge = ridge is None
        self.holdout_every = holdout_every
        width = projection_dim or in_features
        f64 = dict(dtype=torch.float64)
        projection = None
        if projection_dim:
            generator = torch.Generator().manual_seed(seed)
            projection = torch.randn(
                in_features, projection_dim, generator=generator, **f64
            )
        self.register_buffer("projection", projection)
        self.register_buffer("gram", torch.zeros(width, width, **f64))
        self.register_buffer("moment", torch.zeros(width, num_classes, **f64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("readout", torch.zeros(width, num_classes, **f64))
        self.register_buffer(
            "fitted_classes", torch.zeros(num_classes, dtype=torch.bool)
        )
        self.register_buffer(
            "ridge", torch.tensor(float("nan") if ridge is None else ridge, **f64)
        )
        if self.auto_ridge:
            self.register_buffer("holdout_gram", torch.zeros(width, width, **f64))
            self.register_buffer(
                "holdout_moment", torch.zeros(width, num_classes, **f64)
            )

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """x (N, in_features) -> h (N, M) float64: relu(x @ projection), or
        x itself when there is no projection (all in float64)."""
        _check_batch(x, None, self.in_features, self.num_classes)
        h = x.to(torch.float64)
        if self.projection is None:
            return h
        return torch.relu(h @ self.projection)

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Absorb a batch into G, Q and counts: x (N, in_features) float,
        y (N,) int in [0, num_classes). Does not change the readout."""
        _check_batch(x, y, self.in_features, self.num_classes)
        h = self.features(x)
        if self.auto_ridge:
            index = int(self.counts.sum()) + torch.arange(len(y), device=y.device)
            held = index % self.holdout_every == 0
            _accumulate(self.holdout_gram, self.holdout_moment, h[held], y[held])
        _accumulate(self.gram, self.moment, h, y)
        self.counts += torch.bincount(y, minlength=self.num_classes)

    @torch.no_grad()
    def fit(self) -> None:
        """Solve readout = (G + lambda I)^{-1} Q on everything absorbed so far,
        choosing lambda first when it is automatic."""
        if not self.counts.any():
            raise RuntimeError("fit() needs data: call update() with a batch first")
        ridge = self._select_ridge() if self.auto_ridge else float(self.ridge)
        readout = _ridge_solve(self.gram, self.moment, ridge)
        if readout is None:
            raise ValueError(
                f"G + {ridge:g} I is not numerically positive definite "
                f"(Cholesky failed); use a larger ridge"
            )
        self.readout.copy_(readout)
        self.ridge.fill_(ridge)
        self.fitted_classes.copy_(self.counts > 0)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x (N, in_features) -> logits (N, num_classes) in x's dtype.

        Classes without data at the last fit score ``-inf``; before the first
        fit every class scores 0.
        """
        logits = self.features(x) @ self.readout
        if not self.fitted_classes.any():
            return torch.zeros_like(logits, dtype=x.dtype)
        return logits.masked_fill(~self.fitted_classes, float("-inf")).to(x.dtype)

    def _select_ridge(self) -> float:
        """The lambda of RIDGE_GRID with the lowest held-out squared error
        (strongest lambda on ties); lambdas whose system is not numerically
        positive definite are skipped."""
        fit_gram = self.gram - self.holdout_gram
        fit_moment = self.moment - self.holdout_moment
        num_seen = int(self.counts.sum())
        num_held = (num_seen + self.holdout_every - 1) // self.holdout_every
        best, best_error = None, float("inf")
        for ridge in RIDGE_GRID:
            readout = _ridge_solve(fit_gram, fit_moment, ridge)
            if readout is None:
                continue
            # sum_i ||h_i R - y_i||^2 = tr(R^T G_v R) - 2 tr(R^T Q_v) + n_v
            error = float(
                (readout * (self.holdout_gram @ readout)).sum()
                - 2 * (readout * self.holdout_moment).sum()
                + num_held
            )
            if error < best_error:
                best, best_error = ridge, error
        if best is None:
            raise ValueError(
                f"no lambda in {RIDGE_GRID[0]:g}..{RIDGE_GRID[-1]:g} gives a "
                f"numerically positive definite system"
            )
        return best


class RandomProjectionRidge(ClosedFormStrategy):
    """Class-incremental random-projection ridge strategy (no SGD).

    ``model`` is a :class:`RandomProjectionRidgeClassifier`; the experience's
    inputs must already be embeddings of shape (N, in_features). Each
    mini-batch is absorbed into G and Q in the update step (between
    ``before_update`` and ``after_update``) and the readout is re-solved once
    at the end of the pass. Training-time outputs use the readout fitted on
    the previous experiences (prequential, as ``StreamingLDA`` scores before
    fitting), so training cross-entropy is +inf on samples of classes not
    seen yet. Only the first epoch of an experience absorbs data, so the fit
    does not depend on ``train_epochs``. Training the same experience twice
    counts it twice.

    Cost per experience: O(N M^2) for G (float64), plus one Cholesky
    (M^3 / 3) for a fixed lambda or ``len(RIDGE_GRID) + 1`` of them for the
    automatic one. Memory: 1 (fixed lambda) or 2 (automatic) M x M float64
    buffers (200 MB each at M = 5000), plus up to 3 temporaries of that size
    while solving.
    """

    def __init__(
        self,
        *,
        in_features: int,
        num_classes: int,
        projection_dim: int = 5000,
        ridge: Optional[float] = None,
        holdout_every: int = 5,
        seed: int = 0,
        train_mb_size: int = 1024,
        eval_mb_size: int = 1024,
        **kwargs,
    ):
        """
        :param in_features: embedding dimension D.
        :param num_classes: total number of classes of the benchmark.
        :param projection_dim: random feature width M; 0 = no projection.
        :param ridge: fixed lambda > 0, or None for RanPAC-style selection.
        :param holdout_every: held-out split is one sample in this many.
        :param seed: seed of the random projection.
        :param train_mb_size: mini-batch size for the statistics pass.
        :param eval_mb_size: mini-batch size for evaluation.
        :param kwargs: forwarded to ``SupervisedTemplate`` (``device``,
            ``plugins``, ``evaluator``, ``eval_every``, ``criterion``, ...).
        """
        super().__init__(
            model=RandomProjectionRidgeClassifier(
                in_features, num_classes, projection_dim, ridge, holdout_every, seed
            ),
            optimizer=None,  # type: ignore[arg-type]
            train_mb_size=train_mb_size,
            eval_mb_size=eval_mb_size,
            **kwargs,
        )


def _accumulate(gram: Tensor, moment: Tensor, h: Tensor, y: Tensor) -> None:
    """In place: gram += h^T h, moment[:, c] += sum of h rows with label c.
    h (N, M) float64, y (N,) int."""
    gram.addmm_(h.T, h)
    moment.index_add_(1, y, h.T)


def _ridge_solve(gram: Tensor, moment: Tensor, ridge: float) -> Optional[Tensor]:
    """(gram + ridge I)^{-1} moment via Cholesky, (M, C) float64; None if
    gram + ridge I is not numerically positive definite."""
    system = gram.clone()
    system.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        return None
    return torch.cholesky_solve(moment, factor)
