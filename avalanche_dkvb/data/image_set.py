"""The ``ImageSet`` container and the two image datasets it can hold.

An ``ImageSet`` is one split of one labelled image dataset, ready to be embedded by a
frozen encoder: a ``Dataset`` of ``(PIL RGB image or transform(image), int label)``
pairs plus the metadata an embedding cache needs to key on it (``identity``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["SPLITS", "ArrayImageDataset", "FileImageDataset", "ImageSet", "check_split", "files_fingerprint"]

SPLITS = ("train", "test")

Transform = Callable[[Image.Image], Any]


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is one of ``SPLITS``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """One split of a labelled image dataset.

    Attributes:
        dataset: ``Dataset`` of ``(image, label)``; image is a PIL RGB image, or
            ``transform(image)`` if the loader was given a transform.
        targets: (N,) int64 labels, ``targets[i]`` is the label of ``dataset[i]``.
        classes: class names, ``classes[k]`` names label ``k``.
        identity: JSON-serialisable description of exactly which data this is
            (``dataset``, ``split``, ``format``, ``root``, ``num_samples``,
            ``num_classes``, ``fingerprint``), for keying an embedding cache.
    """

    dataset: Dataset
    targets: np.ndarray
    classes: list[str]
    identity: dict[str, Any]

    def __len__(self) -> int:
        return len(self.targets)


class ArrayImageDataset(Dataset):
    """In-memory images: (N, H, W, 3) uint8 array + (N,) labels -> (PIL RGB image, int)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Transform | None = None) -> None:
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class FileImageDataset(Dataset):
    """Image files + (N,) labels -> (PIL RGB image, int); grayscale/palette images become RGB."""

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, transform: Transform | None = None) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} image files but {len(targets)} labels")
        self.paths = list(paths)
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(self.paths[index]) as file:
            image = file.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def files_fingerprint(paths: Sequence[Path], targets: np.ndarray, root: Path) -> str:
    """``sha256:<hex>`` of the ordered ``(path relative to root, size in bytes, label)`` list.

    Cheap (one ``stat`` per file) and sensitive to file set, order, sizes and labels.
    """
    digest = hashlib.sha256()
    for path, label in zip(paths, targets):
        relative = Path(os.path.relpath(path, root)).as_posix()
        digest.update(f"{relative}\t{os.stat(path).st_size}\t{int(label)}\n".encode())
    return f"sha256:{digest.hexdigest()}"
