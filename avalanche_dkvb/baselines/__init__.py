"""Closed-form class-incremental baselines on cached embeddings.

All are Avalanche strategies (``SupervisedTemplate`` subclasses without an
optimizer, like ``avalanche.training.StreamingLDA``), one pass per experience:
nearest class mean and random projection + ridge keep exact, order-independent
statistics; batched streaming LDA reproduces Avalanche's (order-dependent)
streaming covariance update exactly, a minibatch at a time.
"""

from .ncm import NearestClassMean, NearestClassMeanClassifier
from .ridge import RIDGE_GRID, RandomProjectionRidge, RandomProjectionRidgeClassifier
from .slda import BatchedStreamingLDA, BatchedStreamingLDAClassifier

__all__ = [
    "NearestClassMean",
    "NearestClassMeanClassifier",
    "RandomProjectionRidge",
    "RandomProjectionRidgeClassifier",
    "RIDGE_GRID",
    "BatchedStreamingLDA",
    "BatchedStreamingLDAClassifier",
]
