"""Closed-form class-incremental baselines on cached embeddings.

Both are Avalanche strategies (``SupervisedTemplate`` subclasses without an
optimizer, like ``avalanche.training.StreamingLDA``): one pass per
experience, exact order-independent statistics.
"""

from .ncm import NearestClassMean, NearestClassMeanClassifier
from .ridge import RIDGE_GRID, RandomProjectionRidge, RandomProjectionRidgeClassifier

__all__ = [
    "NearestClassMean",
    "NearestClassMeanClassifier",
    "RandomProjectionRidge",
    "RandomProjectionRidgeClassifier",
    "RIDGE_GRID",
]
