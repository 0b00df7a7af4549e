"""Run a frozen image encoder once over a dataset and collect its embeddings.

The encoder maps images ``(B, 3, H, W)`` to embeddings ``(B, D)``; the dataset
yields ``(image_tensor, int_label)`` pairs.  The output is written into one
preallocated ``(N, D)`` float32 array (no list of batches, no concatenated copy).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = ["ExtractionResult", "extract_embeddings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionResult:
    """Embeddings of a whole dataset, in dataset order.

    Attributes:
        embeddings: ``(N, D)`` float32, all values finite; row ``i`` is sample ``i``.
        labels: ``(N,)`` int64; ``labels[i]`` is the label of sample ``i``.
        seconds: wall-clock time of the pass (data loading included).
        images_per_second: ``N / seconds``.

    Unpacks as ``(embeddings, labels)``, so it can be returned directly from an
    :meth:`EmbeddingCache.get_or_compute` ``compute`` callable.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    seconds: float
    images_per_second: float

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.embeddings, self.labels))


def _encoder_device(encoder: nn.Module) -> torch.device:
    """The device of the encoder's first parameter or buffer (CPU if it has none)."""
    tensor = next(itertools.chain(encoder.parameters(), encoder.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def extract_embeddings(
    encoder: nn.Module,
    dataset: Dataset,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "",
) -> ExtractionResult:
    """Embed every sample of ``dataset`` with ``encoder``, in order.

    Runs under ``torch.inference_mode()`` with the encoder in eval mode (its
    previous train/eval mode is restored afterwards), on the encoder's device.

    Args:
        encoder: module mapping ``(B, 3, H, W)`` images to ``(B, D)`` embeddings.
        dataset: map-style dataset of ``(image_tensor, int_label)`` pairs, ``len(dataset) = N > 0``.
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` worker processes.
        progress: show a progress bar (done/total, images/s) on stderr.
        desc: label for the progress bar and the final log line.

    Returns:
        An :class:`ExtractionResult` with ``(N, D)`` float32 embeddings and ``(N,)`` int64 labels.

    Raises:
        ValueError: if the dataset is empty or yields a different number of samples
            than ``len(dataset)``, or if an encoder output is not ``(B, D)`` with the
            same ``D`` for every batch, or contains NaN/inf (the batch is named).
    """
    total = len(dataset)
    if total == 0:
        raise ValueError(f"extract_embeddings{f' ({desc})' if desc else ''}: the dataset is empty")
    device = _encoder_device(encoder)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    embeddings: np.ndarray | None = None  # allocated once D is known (first batch)
    labels = np.empty(total, dtype=np.int64)
    done = 0
    was_training = encoder.training
    encoder.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(
            total=total, desc=desc or None, unit="img", file=sys.stderr, disable=not progress
        ) as bar:
            for batch_index, (images, batch_labels) in enumerate(loader):
                batch = images.shape[0]
                if done + batch > total:
                    raise ValueError(f"the dataset yielded more than len(dataset) = {total} samples")
                out = encoder(images.to(device, non_blocking=True))
                where = f"batch {batch_index} (samples {done}..{done + batch - 1})"
                if out.ndim != 2 or out.shape[0] != batch:
                    raise ValueError(
                        f"encoder output for {where} has shape {tuple(out.shape)}; expected ({batch}, D)"
                    )
                if embeddings is None:
                    embeddings = np.empty((total, out.shape[1]), dtype=np.float32)
                elif out.shape[1] != embeddings.shape[1]:
                    raise ValueError(
                        f"encoder output for {where} has D = {out.shape[1]}, "
                        f"but earlier batches had D = {embeddings.shape[1]}"
                    )
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"encoder output for {where} contains NaN or inf values")
                torch.from_numpy(embeddings[done : done + batch]).copy_(out)
                labels[done : done + batch] = torch.as_tensor(batch_labels).reshape(batch).numpy()
                done += batch
                bar.update(batch)
    finally:
        encoder.train(was_training)
    if done != total:
        raise ValueError(f"the dataset yielded {done} samples, but len(dataset) = {total}")
    seconds = time.perf_counter() - start
    images_per_second = total / seconds if seconds > 0 else float("inf")
    logger.info(
        "embedded %d images%s in %.1f s (%.1f images/s)",
        total, f" ({desc})" if desc else "", seconds, images_per_second,
    )
    return ExtractionResult(embeddings, labels, seconds, images_per_second)
