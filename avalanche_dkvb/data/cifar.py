"""CIFAR-10 and CIFAR-100 from the official python pickle files.

Layout under ``root`` (as the official archives and torchvision unpack it)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each data pickle is a dict with ``b"data"``: (N, 3072) uint8, each row a 32x32 image
stored channel-first (1024 R, then G, then B values, each row-major), and the labels
under ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100; the 100 fine classes
are used). The pickles are read here directly; torchvision is only used to download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from avalanche_dkvb.data.image_set import ArrayImageDataset, ImageSet, Transform, check_split

__all__ = ["CIFAR10", "CIFAR100", "CifarSpec", "load_cifar", "load_cifar10", "load_cifar100"]


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    """What distinguishes the two CIFAR pickle datasets."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    url: str
    torchvision_class: str

    @property
    def all_files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10 = CifarSpec(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    torchvision_class="CIFAR10",
)

CIFAR100 = CifarSpec(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    torchvision_class="CIFAR100",
)


def load_cifar10(root: str | Path, split: str, *, download: bool = False, transform: Transform | None = None) -> ImageSet:
    """CIFAR-10 ``split`` ("train": 50,000 or "test": 10,000 images, 10 classes)."""
    return load_cifar(CIFAR10, root, split, download=download, transform=transform)


def load_cifar100(root: str | Path, split: str, *, download: bool = False, transform: Transform | None = None) -> ImageSet:
    """CIFAR-100 ``split`` ("train": 50,000 or "test": 10,000 images, 100 fine classes)."""
    return load_cifar(CIFAR100, root, split, download=download, transform=transform)


def load_cifar(
    spec: CifarSpec, root: str | Path, split: str, *, download: bool = False, transform: Transform | None = None
) -> ImageSet:
    """Load one split of the CIFAR dataset described by ``spec`` from ``root/<spec.folder>``.

    Missing files are downloaded with torchvision if ``download`` is true; otherwise,
    or if the download fails, FileNotFoundError says what is missing and how to get it.
    """
    check_split(split)
    folder = Path(root).resolve() / spec.folder
    if _missing(spec, folder) and download:
        _download(spec, Path(root))
    missing = _missing(spec, folder)
    if missing:
        raise FileNotFoundError(_missing_message(spec, Path(root), missing))

    files = spec.train_files if split == "train" else spec.test_files
    digest = hashlib.sha256()
    images, labels = [], []
    for name in files:
        batch = _read_pickle(folder / name, digest)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[spec.label_key], dtype=np.int64))
    classes = [n.decode() for n in _read_pickle(folder / spec.meta_file)[spec.names_key]]
    targets = np.concatenate(labels)
    if targets.min() < 0 or targets.max() >= len(classes):
        raise ValueError(f"{folder}: labels outside 0..{len(classes) - 1} (meta lists {len(classes)} classes)")

    identity = {
        "dataset": spec.name,
        "split": split,
        "format": "cifar-python-pickle",
        "root": str(folder),
        "num_samples": len(targets),
        "num_classes": len(classes),
        "fingerprint": f"sha256:{digest.hexdigest()}",
    }
    dataset = ArrayImageDataset(np.ascontiguousarray(np.concatenate(images)), targets, transform)
    return ImageSet(dataset=dataset, targets=targets, classes=classes, identity=identity)


def _read_pickle(path: Path, digest: Any = None) -> dict:
    """Unpickle an official CIFAR file (byte-string keys); feed its bytes to ``digest`` if given."""
    raw = path.read_bytes()
    if digest is not None:
        digest.update(raw)
    return pickle.loads(raw, encoding="bytes")


def _missing(spec: CifarSpec, folder: Path) -> list[str]:
    return [name for name in spec.all_files if not (folder / name).is_file()]


def _missing_message(spec: CifarSpec, root: Path, missing: list[str]) -> str:
    return (
        f"{spec.name} python files not found: expected {root.resolve() / spec.folder} containing "
        f"{', '.join(spec.all_files)} (missing: {', '.join(missing)}). "
        f"Download and extract the official archive {spec.url} into {root.resolve()}, "
        f"pass download=True on a machine with internet, "
        f"or give as root (data_root) a folder that contains {spec.folder}/."
    )


def _download(spec: CifarSpec, root: Path) -> None:
    """Download and extract the official archive into ``root`` with torchvision."""
    from torchvision import datasets

    try:
        getattr(datasets, spec.torchvision_class)(str(root), download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; RuntimeError: bad checksum
        missing = _missing(spec, root.resolve() / spec.folder)
        raise FileNotFoundError(f"{_missing_message(spec, root, missing)} Download failed: {error}") from error
