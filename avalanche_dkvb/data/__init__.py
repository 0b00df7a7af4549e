"""Data: labelled image sets to embed, and class-incremental streams over embeddings.

(A) ``load_image_set(name, split, root)`` -> ``ImageSet`` (a ``Dataset`` of
``(PIL RGB image, int label)``, ``targets``, ``classes``, ``identity``) for
``cifar10``, ``cifar10_jpeg``, ``cifar100`` and ``tiny_imagenet``.

(B) ``make_class_incremental_benchmark(train_x, train_y, test_x, test_y,
n_experiences, seed)`` -> an Avalanche class-incremental benchmark.
"""

from avalanche_dkvb.data.archive import extract_archive
from avalanche_dkvb.data.cifar import load_cifar10, load_cifar100
from avalanche_dkvb.data.image_folder import CIFAR10_CLASSES, load_cifar10_jpeg, scan_class_folders
from avalanche_dkvb.data.image_set import ArrayImageDataset, FileImageDataset, ImageSet
from avalanche_dkvb.data.registry import IMAGE_SETS, LOCAL_ARCHIVES, NUM_CLASSES, load_image_set
from avalanche_dkvb.data.streams import DEFAULT_EXPERIENCES, class_order_for_seed, make_class_incremental_benchmark
from avalanche_dkvb.data.tiny_imagenet import load_tiny_imagenet

__all__ = [
    "ArrayImageDataset",
    "CIFAR10_CLASSES",
    "DEFAULT_EXPERIENCES",
    "FileImageDataset",
    "IMAGE_SETS",
    "ImageSet",
    "LOCAL_ARCHIVES",
    "NUM_CLASSES",
    "class_order_for_seed",
    "extract_archive",
    "load_cifar10",
    "load_cifar10_jpeg",
    "load_cifar100",
    "load_image_set",
    "load_tiny_imagenet",
    "make_class_incremental_benchmark",
    "scan_class_folders",
]
