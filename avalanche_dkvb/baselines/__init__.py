"""Class-incremental baselines on cached embeddings: closed-form ones, and SI made to work on a CPU.

All are Avalanche strategies (``SupervisedTemplate`` subclasses without an
optimizer, like ``avalanche.training.StreamingLDA``), one pass per experience:
nearest class mean and random projection + ridge keep exact, order-independent
statistics; batched streaming LDA reproduces Avalanche's (order-dependent)
streaming covariance update exactly, a minibatch at a time. ``CopyingSynapticIntelligence`` is
Avalanche's SI with its parameter snapshots copied (on a CPU, Avalanche's own SI equals Naive).
"""

from .ncm import NearestClassMean, NearestClassMeanClassifier
from .ridge import RIDGE_GRID, RandomProjectionRidge, RandomProjectionRidgeClassifier
from .slda import BatchedStreamingLDA, BatchedStreamingLDAClassifier
from .synaptic_intelligence import CopyingSynapticIntelligence, CopyingSynapticIntelligencePlugin

__all__ = [
    "NearestClassMean",
    "NearestClassMeanClassifier",
    "RandomProjectionRidge",
    "RandomProjectionRidgeClassifier",
    "RIDGE_GRID",
    "BatchedStreamingLDA",
    "BatchedStreamingLDAClassifier",
    "CopyingSynapticIntelligence",
    "CopyingSynapticIntelligencePlugin",
]
