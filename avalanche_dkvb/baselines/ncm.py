"""Nearest-class-mean (NCM) baseline on cached embeddings.

``NearestClassMeanClassifier`` keeps exact per-class running sums of the
embeddings; ``NearestClassMean`` is the Avalanche strategy that fills them in
one pass over each experience, without an optimizer.

Avalanche's own ``avalanche.models.NCMClassifier`` is not reused: it gives
classes without a mean a zero vector (which can win the argmax), its output
width grows with the largest class id seen instead of being fixed, and it
merges means across experiences with a momentum average instead of exact
running sums.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .closed_form import ClosedFormStrategy


class NearestClassMeanClassifier(nn.Module):
    """Nearest-class-mean classifier with exact running class sums.

    State (buffers, so it moves with ``.to`` and lives in ``state_dict``):

    * ``sums``: (num_classes, in_features) float64, sum of the embeddings
      absorbed per class;
    * ``counts``: (num_classes,) int64, number of embeddings absorbed per class.

    Invariant: ``means[c] == sums[c] / counts[c]`` is the exact mean of every
    embedding of class ``c`` absorbed so far, whatever the batching or order.

    Scores: (N, num_classes), the negative Euclidean distance to each class
    mean, or the cosine similarity with it when ``cosine=True`` (mean of the
    raw embeddings, then cosine). Classes with no data score ``-inf`` so they
    never win; if no class has data yet, every class scores 0.
    """

    def __init__(self, in_features: int, num_classes: int, cosine: bool = False):
        """
        :param in_features: embedding dimension D.
        :param num_classes: total number of classes of the benchmark; fixes
            the output width.
        :param cosine: score by cosine similarity instead of negative
            Euclidean distance.
        """
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(
                f"in_features and num_classes must be >= 1, got "
                f"in_features={in_features}, num_classes={num_classes}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.cosine = cosine
        self.register_buffer(
            "sums", torch.zeros(num_classes, in_features, dtype=torch.float64)
        )
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))

    @property
    def seen_classes(self) -> Tensor:
        """(num_classes,) bool: which classes have at least one embedding."""
        return self.counts > 0

    @property
    def means(self) -> Tensor:
        """(num_classes, in_features) float64 class means; zero rows for
        classes with no data."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Absorb a batch: x (N, in_features) float, y (N,) int in
        [0, num_classes)."""
        _check_batch(x, y, self.in_features, self.num_classes)
        self.sums.index_add_(0, y, x.to(torch.float64))
        self.counts += torch.bincount(y, minlength=self.num_classes)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x (N, in_features) -> scores (N, num_classes) in x's dtype."""
        _check_batch(x, None, self.in_features, self.num_classes)
        x64 = x.to(torch.float64)
        if self.cosine:
            scores = F.normalize(x64, dim=1) @ F.normalize(self.means, dim=1).T
        else:
            scores = -torch.cdist(x64, self.means)
        seen = self.seen_classes
        if not seen.any():
            return torch.zeros_like(scores, dtype=x.dtype)
        return scores.masked_fill(~seen, float("-inf")).to(x.dtype)


class NearestClassMean(ClosedFormStrategy):
    """Class-incremental NCM strategy on cached embeddings (no SGD).

    ``model`` is a :class:`NearestClassMeanClassifier`; the experience's
    inputs must already be embeddings of shape (N, in_features). Each
    mini-batch is absorbed in the update step (between ``before_update`` and
    ``after_update``); as in ``StreamingLDA``, the output used for the
    training metrics is computed before the mini-batch is absorbed, so
    training accuracy is prequential and the training cross-entropy is +inf on
    samples of classes not seen yet (their score is -inf). Only the first
    epoch of an experience absorbs data, so the fit does not depend on
    ``train_epochs``. Training the same experience twice counts it twice.
    """

    def __init__(
        self,
        *,
        in_features: int,
        num_classes: int,
        cosine: bool = False,
        train_mb_size: int = 1024,
        eval_mb_size: int = 1024,
        **kwargs,
    ):
        """
        :param in_features: embedding dimension D.
        :param num_classes: total number of classes of the benchmark.
        :param cosine: nearest mean by cosine similarity instead of
            Euclidean distance.
        :param train_mb_size: mini-batch size for the statistics pass.
        :param eval_mb_size: mini-batch size for evaluation.
        :param kwargs: forwarded to ``SupervisedTemplate`` (``device``,
            ``plugins``, ``evaluator``, ``eval_every``, ``criterion``, ...).
        """
        super().__init__(
            model=NearestClassMeanClassifier(in_features, num_classes, cosine),
            optimizer=None,  # type: ignore[arg-type]
            train_mb_size=train_mb_size,
            eval_mb_size=eval_mb_size,
            **kwargs,
        )


def _check_batch(x: Tensor, y: Tensor | None, in_features: int, num_classes: int):
    """Raise ValueError unless x is (N, in_features) floating and y (if given)
    is (N,) integer with values in [0, num_classes)."""
    if x.ndim != 2 or x.shape[1] != in_features or not x.is_floating_point():
        raise ValueError(
            f"expected float embeddings of shape (N, {in_features}), "
            f"got {x.dtype} tensor of shape {tuple(x.shape)}"
        )
    if y is None:
        return
    if y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(
            f"expected integer labels of shape ({x.shape[0]},), "
            f"got {y.dtype} tensor of shape {tuple(y.shape)}"
        )
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(y.min())}, {int(y.max())}]"
        )
