"""Tiny-ImageNet-200 from the official folder layout ``root/tiny-imagenet-200/``::

    wnids.txt                      the 200 class ids; label k = line k (as Avalanche's TinyImagenet)
    words.txt                      "<wnid>\\t<names>" lines; the class name of a wnid
    train/<wnid>/images/*.JPEG     500 per class -> split "train"
    val/images/*.JPEG              50 per class  -> split "test" (the unlabelled test split is unused)
    val/val_annotations.txt        "<file>\\t<wnid>\\t<box>" lines, in the order used for "test"

Images are 64x64; the grayscale ones are converted to RGB when read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avalanche_dkvb.data.archive import describe_archive, extract_archive, local_archive
from avalanche_dkvb.data.image_folder import IMAGE_SUFFIXES
from avalanche_dkvb.data.image_set import FileImageDataset, ImageSet, Transform, check_split, files_fingerprint

__all__ = [
    "TINY_IMAGENET_ARCHIVE_NAME",
    "TINY_IMAGENET_FOLDER",
    "TINY_IMAGENET_MD5",
    "TINY_IMAGENET_URL",
    "load_tiny_imagenet",
]

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_ARCHIVE_NAME = "tiny-imagenet-200-trainval.tar.gz"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def load_tiny_imagenet(
    root: str | Path,
    split: str,
    *,
    download: bool = False,
    transform: Transform | None = None,
    archive: str | Path | None = None,
) -> ImageSet:
    """Tiny-ImageNet-200 ``split`` ("train": 100,000 images; "test": the 10,000 val images).

    If ``root/tiny-imagenet-200`` is absent and ``download`` is true, it is extracted
    (atomically) from the local ``archive`` (default: ``tiny-imagenet-200-trainval.tar.gz``
    in ``default_archive_dir()``) if that exists, else from the official zip downloaded
    with torchvision.
    """
    check_split(split)
    root = Path(root).resolve()
    folder = root / TINY_IMAGENET_FOLDER
    archive = local_archive(archive, TINY_IMAGENET_ARCHIVE_NAME)
    if not folder.is_dir() and download:
        _fetch(root, archive)
    required = ["wnids.txt", "words.txt", "train" if split == "train" else "val/val_annotations.txt"]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"tiny_imagenet not found: expected {folder} in the official layout (missing: {', '.join(missing)}). "
            f"Pass download=True to extract {describe_archive(archive)} or download "
            f"{TINY_IMAGENET_URL}, unzip that archive into {root}, "
            f"or give as root (data_root) a folder that contains {TINY_IMAGENET_FOLDER}/."
        )

    wnids = _read_wnids(folder / "wnids.txt")
    classes = _class_names(folder / "words.txt", wnids)
    if split == "train":
        paths, targets = _train_files(folder / "train", wnids)
    else:
        paths, targets = _val_files(folder / "val", wnids)
    identity = {
        "dataset": "tiny_imagenet",
        "split": split,
        "format": "tiny-imagenet-folder",
        "root": str(folder),
        "num_samples": len(targets),
        "num_classes": len(wnids),
        "fingerprint": files_fingerprint(paths, targets, folder),
    }
    dataset = FileImageDataset(paths, targets, transform)
    return ImageSet(dataset=dataset, targets=targets, classes=classes, identity=identity)


def _fetch(root: Path, archive: Path | None) -> None:
    """Extract ``archive`` (or the downloaded official zip) to ``root/tiny-imagenet-200``."""
    if archive is None or not archive.is_file():
        from torchvision.datasets.utils import download_url

        archive = root / Path(TINY_IMAGENET_URL).name
        try:
            download_url(TINY_IMAGENET_URL, str(root), archive.name, md5=TINY_IMAGENET_MD5)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; RuntimeError: bad checksum
            raise FileNotFoundError(f"could not download {TINY_IMAGENET_URL} to {archive}: {error}") from error
    extract_archive(archive, root / TINY_IMAGENET_FOLDER, member_root=TINY_IMAGENET_FOLDER)


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: duplicate wnids")
    return wnids


def _class_names(words_path: Path, wnids: list[str]) -> list[str]:
    """The words.txt entry of each wnid, e.g. "goldfish, Carassius auratus"."""
    words = dict(line.split("\t", 1) for line in words_path.read_text().splitlines() if "\t" in line)
    unnamed = [w for w in wnids if w not in words]
    if unnamed:
        raise ValueError(f"{words_path}: no entry for wnids {unnamed[:5]}{' ...' if len(unnamed) > 5 else ''}")
    return [words[w].strip() for w in wnids]


def _train_files(train_dir: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    """``train/<wnid>/images/*`` ordered by label, then file name."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images_dir = train_dir / wnid / "images"
        if not images_dir.is_dir():
            raise FileNotFoundError(f"missing training images folder {images_dir} for class {wnid}")
        files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{images_dir}: no images for class {wnid}")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _val_files(val_dir: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    """``val/images/*`` in ``val_annotations.txt`` order, labelled by the annotated wnid."""
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    annotations = val_dir / "val_annotations.txt"
    paths: list[Path] = []
    labels: list[int] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise ValueError(f"{annotations}:{number}: expected '<file>\\t<wnid from wnids.txt>\\t...', got {line!r}")
        paths.append(val_dir / "images" / fields[0])
        labels.append(label_of[fields[1]])
    return paths, np.asarray(labels, dtype=np.int64)
