"""Images -> frozen encoder -> cached embeddings, for one (encoder, weights, image set, split)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from torch.utils.data import Subset

from avalanche_dkvb.data import load_image_set
from avalanche_dkvb.embeddings.cache import CachedEmbeddings, EmbeddingCache
from avalanche_dkvb.embeddings.extract import extract_embeddings
from avalanche_dkvb.encoders import check_backend_settings, create_encoder, get_encoder_spec, inference_encoder
from avalanche_dkvb.locations import default_cache_root
from avalanche_dkvb.validation import check_non_negative_int, check_positive_int


def cached_embeddings(
    encoder: str,
    image_set: str,
    split: str,
    *,
    weights: str | os.PathLike | None = "default",
    data_root: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
    archive_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    per_class: int | None = None,
    batch_size: int = 128,
    num_workers: int = 1,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
) -> CachedEmbeddings:
    """Embeddings (N, D) and labels (N,) of ``image_set``'s ``split`` under ``encoder``, computed
    once and then read from ``cache_root``; the cache key covers encoder, weights, preprocessing
    and the data's identity, so changing any of them recomputes.

    ``image_size`` overrides the encoder's input resolution (a cheaper, documented deviation from
    its pretrained configuration); ``per_class`` keeps only the first that many samples of each
    class, in the data set's order (sliced from the whole split's entry when that is cached).
    ``data_root`` and ``archive_dir`` are ``load_image_set``'s
    ``root`` and ``archive_dir``; ``cache_root`` defaults to ``default_cache_root()``. ``backend``
    (one of ``encoders.BACKENDS``), ``device`` ("cpu", "cuda", "auto") and ``threads`` go to
    ``inference_encoder``; every backend gives the eager float32 embeddings within its tolerance, so
    they are not part of the key. ``num_workers`` DataLoader processes decode and resize the images.
    The settings are checked before any data is read.
    """
    for name, value in (("image_size", image_size), ("per_class", per_class)):
        if value is not None:
            check_positive_int(name, value)
    check_positive_int("batch_size", batch_size)
    check_non_negative_int("num_workers", num_workers)
    check_backend_settings(backend, device, threads)
    spec = get_encoder_spec(encoder)
    if image_size is not None:
        spec = dataclasses.replace(spec, input_size=image_size)
    images = load_image_set(image_set, split, root=data_root, download=download, transform=spec.transform(),
                            archive_dir=archive_dir)
    dataset = images.dataset
    cache = EmbeddingCache(default_cache_root() if cache_root is None else cache_root)

    def key_of(subset: int | None) -> dict:
        return EmbeddingCache.key_for(spec.fingerprint(weights), images.identity, split, extra={"per_class": subset})

    if per_class is not None:
        keep = first_per_class(images.targets, per_class)
        dataset = Subset(dataset, keep)

    def compute():
        full = cache.find(key_of(None)) if per_class is not None else None
        if full is not None and np.array_equal(full.labels, images.targets):
            # The whole split is cached, rows in data set order: its first-per-class rows are the subset's
            # embeddings (same images, same encoder), so nothing is extracted again.
            return np.asarray(full.embeddings[keep]), full.labels[keep]
        model = inference_encoder(create_encoder(encoder, weights), backend, device, threads)
        return extract_embeddings(model, dataset, batch_size=batch_size, num_workers=num_workers,
                                  desc=f"{encoder} {image_set}/{split} ({model.backend})")

    return cache.get_or_compute(key_of(per_class), compute)


def first_per_class(targets: np.ndarray, per_class: int) -> list[int]:
    """Indices of the first ``per_class`` samples of every class, in data set order."""
    check_positive_int("per_class", per_class)
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(targets.tolist()):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return keep
