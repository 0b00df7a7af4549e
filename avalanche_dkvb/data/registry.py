"""Image sets by name: ``load_image_set("cifar10", "train", root)``.

Every dataset lives in its own folder under one data root (default
``avalanche_dkvb.locations.default_data_root()``)::

    cifar10        root/cifar-10-batches-py/   official python pickles
    cifar10_jpeg   root/cifar10-jpeg/          train|test/<class>/*.jpg
    cifar100       root/cifar-100-python/      official python pickles
    tiny_imagenet  root/tiny-imagenet-200/     official folder layout
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from avalanche_dkvb.data.cifar import load_cifar10, load_cifar100
from avalanche_dkvb.data.image_folder import CIFAR10_JPEG_ARCHIVE_NAME, load_cifar10_jpeg
from avalanche_dkvb.data.image_set import ImageSet, Transform
from avalanche_dkvb.data.tiny_imagenet import TINY_IMAGENET_ARCHIVE_NAME, load_tiny_imagenet
from avalanche_dkvb.locations import default_data_root

__all__ = ["IMAGE_SETS", "LOCAL_ARCHIVES", "NUM_CLASSES", "load_image_set"]

IMAGE_SETS: dict[str, Callable[..., ImageSet]] = {
    "cifar10": load_cifar10,
    "cifar10_jpeg": load_cifar10_jpeg,
    "cifar100": load_cifar100,
    "tiny_imagenet": load_tiny_imagenet,
}
"""Loader of each image set: ``loader(root, split, *, download, transform) -> ImageSet``."""

LOCAL_ARCHIVES = {"cifar10_jpeg": CIFAR10_JPEG_ARCHIVE_NAME, "tiny_imagenet": TINY_IMAGENET_ARCHIVE_NAME}
"""File name of the local archive an image set can be extracted from (in an ``archive_dir``)."""

NUM_CLASSES = {"cifar10": 10, "cifar10_jpeg": 10, "cifar100": 100, "tiny_imagenet": 200}
"""Number of classes of each image set, known before any data is read (e.g. to check a split)."""


def load_image_set(
    name: str,
    split: str,
    root: str | Path | None = None,
    download: bool = False,
    transform: Transform | None = None,
    archive_dir: str | Path | None = None,
) -> ImageSet:
    """Load ``split`` ("train" or "test") of the image set ``name`` (a key of ``IMAGE_SETS``) from
    ``root`` (default ``default_data_root()``).

    ``download``: fetch missing data (official download for cifar10/cifar100/
    tiny_imagenet, extraction of the local archive for cifar10_jpeg/tiny_imagenet: the
    ``LOCAL_ARCHIVES`` file in ``archive_dir``, default ``default_archive_dir()``).
    """
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}: expected one of {', '.join(IMAGE_SETS)}")
    root = default_data_root() if root is None else root
    archive = {}
    if archive_dir is not None and name in LOCAL_ARCHIVES:
        archive["archive"] = Path(archive_dir) / LOCAL_ARCHIVES[name]
    return IMAGE_SETS[name](root, split, download=download, transform=transform, **archive)
