"""Images -> frozen encoder -> cached embeddings, for one (encoder, weights, image set, split)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from avalanche_dkvb.data import DEFAULT_DATA_ROOT, load_image_set
from avalanche_dkvb.embeddings.cache import CachedEmbeddings, EmbeddingCache
from avalanche_dkvb.embeddings.extract import extract_embeddings
from avalanche_dkvb.encoders import create_encoder, get_encoder_spec

DEFAULT_CACHE_ROOT = Path(DEFAULT_DATA_ROOT).parent / ".cache" / "embeddings"


def cached_embeddings(
    encoder: str,
    image_set: str,
    split: str,
    *,
    weights: str | os.PathLike | None = "default",
    data_root: str | os.PathLike = DEFAULT_DATA_ROOT,
    cache_root: str | os.PathLike = DEFAULT_CACHE_ROOT,
    download: bool = False,
    image_size: int | None = None,
    per_class: int | None = None,
    batch_size: int = 128,
    num_workers: int = 1,
) -> CachedEmbeddings:
    """Embeddings (N, D) and labels (N,) of ``image_set``'s ``split`` under ``encoder``, computed
    once and then read from ``cache_root``; the cache key covers encoder, weights, preprocessing
    and the data's identity, so changing any of them recomputes.

    ``image_size`` overrides the encoder's input resolution (a cheaper, documented deviation from
    its pretrained configuration); ``per_class`` keeps only the first that many samples of each
    class, in the data set's order.
    """
    spec = get_encoder_spec(encoder)
    if image_size is not None:
        spec = dataclasses.replace(spec, input_size=image_size)
    images = load_image_set(image_set, split, root=data_root, download=download, transform=spec.transform())
    dataset = images.dataset
    if per_class is not None:
        dataset = Subset(dataset, first_per_class(images.targets, per_class))
    key = EmbeddingCache.key_for(spec.fingerprint(weights), images.identity, split, extra={"per_class": per_class})

    def compute():
        return extract_embeddings(create_encoder(encoder, weights), dataset, batch_size=batch_size,
                                  num_workers=num_workers, desc=f"{encoder} {image_set}/{split}")

    return EmbeddingCache(cache_root).get_or_compute(key, compute)


def first_per_class(targets: np.ndarray, per_class: int) -> list[int]:
    """Indices of the first ``per_class`` samples of every class, in data set order."""
    if per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class}.")
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(targets.tolist()):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return keep
