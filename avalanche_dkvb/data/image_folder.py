"""Image-folder datasets (``<split>/<class>/<image>``), and CIFAR-10 stored that way.

The CIFAR-10 JPEG copy (an archive ``cifar10-jpeg.tar.gz``, no online source) unpacks to
``train/<class>/NNNN.jpg`` (5,000 per class) and ``test/<class>/NNNN.jpg`` (1,000 per
class); it is read from ``root/cifar10-jpeg/``. Its pixels are JPEG-compressed
(quality 75), so results on it are "CIFAR-10 (JPEG copy)", not CIFAR-10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from avalanche_dkvb.data.archive import describe_archive, extract_archive, local_archive
from avalanche_dkvb.data.image_set import FileImageDataset, ImageSet, Transform, check_split, files_fingerprint

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_ARCHIVE_NAME",
    "CIFAR10_JPEG_FOLDER",
    "IMAGE_SUFFIXES",
    "load_cifar10_jpeg",
    "scan_class_folders",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""CIFAR-10 class names in official label order 0..9 (``batches.meta``)."""

CIFAR10_JPEG_FOLDER = "cifar10-jpeg"
CIFAR10_JPEG_ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def scan_class_folders(split_dir: Path, class_names: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Image paths under ``split_dir/<class>/`` and their (N,) int64 labels.

    Label ``k`` is ``class_names[k]`` (an explicit mapping, not alphabetical order).
    Samples are ordered by label, then file name. Raises FileNotFoundError if
    ``split_dir`` or a class folder is missing, ValueError for an unexpected class
    folder or an empty class.
    """
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {split_dir}")
    folders = {p.name for p in split_dir.iterdir() if p.is_dir()}
    missing = [c for c in class_names if c not in folders]
    if missing:
        raise FileNotFoundError(f"{split_dir}: missing class folders {missing}; expected one folder per class {list(class_names)}")
    unexpected = sorted(folders - set(class_names))
    if unexpected:
        raise ValueError(f"{split_dir}: unexpected class folders {unexpected}; expected exactly {list(class_names)}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{split_dir / name}: no images ({'/'.join(IMAGE_SUFFIXES)} files) for class {name!r}")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def load_cifar10_jpeg(
    root: str | Path,
    split: str,
    *,
    download: bool = False,
    transform: Transform | None = None,
    archive: str | Path | None = None,
) -> ImageSet:
    """CIFAR-10 (JPEG copy) ``split`` from ``root/cifar10-jpeg/<split>/<class>/*.jpg``.

    If that folder is absent and ``download`` is true, ``archive`` (default:
    ``cifar10-jpeg.tar.gz`` in ``default_archive_dir()``) is extracted there (atomically;
    there is no online source for this copy).
    """
    check_split(split)
    folder = Path(root).resolve() / CIFAR10_JPEG_FOLDER
    archive = local_archive(archive, CIFAR10_JPEG_ARCHIVE_NAME)
    if not folder.is_dir():
        if download and archive is not None and archive.is_file():
            extract_archive(archive, folder)
        else:
            raise FileNotFoundError(
                f"cifar10_jpeg not found: expected {folder} containing train/<class>/*.jpg and test/<class>/*.jpg "
                f"for classes {', '.join(CIFAR10_CLASSES)}. Pass download=True to extract {describe_archive(archive)} "
                f"there, run `mkdir -p {folder} && tar xzf cifar10-jpeg.tar.gz -C {folder}`, "
                f"or give as root (data_root) a folder that contains {CIFAR10_JPEG_FOLDER}/."
            )
    paths, targets = scan_class_folders(folder / split, CIFAR10_CLASSES)
    identity = {
        "dataset": "cifar10_jpeg",
        "split": split,
        "format": "image-folder",
        "root": str(folder),
        "num_samples": len(targets),
        "num_classes": len(CIFAR10_CLASSES),
        "fingerprint": files_fingerprint(paths, targets, folder),
    }
    dataset = FileImageDataset(paths, targets, transform)
    return ImageSet(dataset=dataset, targets=targets, classes=list(CIFAR10_CLASSES), identity=identity)
