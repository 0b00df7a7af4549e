"""Frozen-encoder embeddings: one batched extraction pass, cached on disk and memory-mapped."""

from avalanche_dkvb.embeddings.cache import (
    CACHE_FORMAT_VERSION,
    CachedEmbeddings,
    EmbeddingCache,
    key_fingerprint,
)
from avalanche_dkvb.embeddings.extract import ExtractionResult, extract_embeddings

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CachedEmbeddings",
    "EmbeddingCache",
    "ExtractionResult",
    "extract_embeddings",
    "key_fingerprint",
]
