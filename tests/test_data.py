"""Tests of avalanche_dkvb.data: image-set loaders on tiny fixtures in the official formats, and streams."""

from __future__ import annotations

import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avalanche_dkvb.data import (
    CIFAR10_CLASSES,
    DEFAULT_EXPERIENCES,
    IMAGE_SETS,
    class_order_for_seed,
    extract_archive,
    load_cifar10,
    load_cifar10_jpeg,
    load_cifar100,
    load_image_set,
    load_tiny_imagenet,
    make_class_incremental_benchmark,
    scan_class_folders,
)
from benchmarks.paths import ARCHIVE_DIR

torch.set_num_threads(1)

IDENTITY_KEYS = {"dataset", "split", "format", "root", "num_samples", "num_classes", "fingerprint"}


# --------------------------------------------------------------------------- fixtures


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> tuple[Path, dict]:
    """root/cifar-10-batches-py in the official format: 5 train batches of 3 images, a test batch of 4."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    stored = {"train_data": [], "train_labels": []}
    for i in range(1, 6):
        data, labels = _cifar_rows(rng, 3), rng.integers(0, 10, 3).tolist()
        _dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * 3})
        stored["train_data"].append(data)
        stored["train_labels"] += labels
    stored["train_data"] = np.concatenate(stored["train_data"])
    stored["test_data"], stored["test_labels"] = _cifar_rows(rng, 4), [9, 0, 3, 3]
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": stored["test_labels"], b"data": stored["test_data"], b"filenames": [b"x.png"] * 4})
    _dump(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072})
    return tmp_path, stored


@pytest.fixture
def cifar100_root(tmp_path: Path) -> tuple[Path, dict]:
    """root/cifar-100-python in the official format: 6 train and 3 test images; coarse labels differ from fine."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    stored = {"train_data": _cifar_rows(rng, 6), "train_fine": [99, 0, 42, 7, 7, 63], "test_data": _cifar_rows(rng, 3), "test_fine": [5, 98, 1]}
    for split in ("train", "test"):
        fine = stored[f"{split}_fine"]
        _dump(folder / split, {b"filenames": [b"x.png"] * len(fine), b"batch_label": split.encode(), b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": stored[f"{split}_data"]})
    fine_names = [f"fine_{k:02d}" for k in range(100)]
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in fine_names], b"coarse_label_names": [f"coarse_{k}".encode() for k in range(20)]})
    return tmp_path, stored


def _as_image(row: np.ndarray) -> np.ndarray:
    """Official CIFAR row (3072,) -> (32, 32, 3) HWC."""
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


def _write_image(path: Path, color: tuple[int, ...], mode: str = "RGB", size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color if mode == "RGB" else color[0]).save(path, quality=95)


def _class_color(label: int) -> tuple[int, int, int]:
    return (20 * label + 10, 255 - 20 * label, 128)


def _write_cifar10_jpeg_tree(folder: Path, per_class: int = 2) -> None:
    """folder/{train,test}/<class>/NNNN.jpg, every image a solid colour identifying its class."""
    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            for j in range(per_class):
                _write_image(folder / split / name / f"{j:04d}.jpg", _class_color(label))


def _mean_color(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)


TINY_WNIDS = ["n09999999", "n01443537", "n05555555"]  # not sorted: labels must follow file order


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """root/tiny-imagenet-200 with 3 wnids, 2 train images each (one grayscale), 4 val images."""
    folder = tmp_path / "tiny-imagenet-200"
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text(
        "n00000001\tentity\nn01443537\tgoldfish, Carassius auratus\nn05555555\tthing\nn09999999\tzebra\n"
    )
    for label, wnid in enumerate(TINY_WNIDS):
        (folder / "train" / wnid).mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j in range(2):
            _write_image(folder / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", _class_color(label), size=64)
    _write_image(folder / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_1.JPEG", (200,), mode="L", size=64)
    val = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1), ("val_3.JPEG", 2)]
    for name, label in val:
        _write_image(folder / "val" / "images" / name, _class_color(label), size=64)
    (folder / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{TINY_WNIDS[k]}\t0\t0\t10\t10\n" for n, k in val))
    return tmp_path


def _tar_gz(path: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return path


# --------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_pickles_labels_pixels_and_names(cifar10_root):
    root, stored = cifar10_root
    train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
    assert len(train) == len(train.dataset) == 15 and len(test) == 4
    assert train.targets.dtype == np.int64
    np.testing.assert_array_equal(train.targets, stored["train_labels"])
    np.testing.assert_array_equal(test.targets, stored["test_labels"])
    assert train.classes == list(CIFAR10_CLASSES)
    for i in (0, 7, 14):  # first, middle (batch 3) and last training image
        image, label = train.dataset[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(image), _as_image(stored["train_data"][i]))
        assert label == stored["train_labels"][i] and isinstance(label, int)
    np.testing.assert_array_equal(np.asarray(test.dataset[3][0]), _as_image(stored["test_data"][3]))
    assert set(train.identity) == IDENTITY_KEYS
    assert train.identity["dataset"] == "cifar10" and train.identity["split"] == "train"
    assert train.identity["num_samples"] == 15 and train.identity["num_classes"] == 10
    assert train.identity["root"] == str((root / "cifar-10-batches-py").resolve())
    assert train.identity["fingerprint"] != test.identity["fingerprint"]


def test_cifar100_uses_fine_labels_and_names(cifar100_root):
    root, stored = cifar100_root
    train, test = load_cifar100(root, "train"), load_cifar100(root, "test")
    np.testing.assert_array_equal(train.targets, stored["train_fine"])
    np.testing.assert_array_equal(test.targets, stored["test_fine"])
    assert len(train.classes) == 100 and train.classes[42] == "fine_42"
    np.testing.assert_array_equal(np.asarray(test.dataset[2][0]), _as_image(stored["test_data"][2]))
    assert test.dataset[1][1] == 98
    assert train.identity["dataset"] == "cifar100" and train.identity["num_classes"] == 100


def test_transform_is_applied_to_the_pil_image(cifar10_root):
    root, stored = cifar10_root
    image_set = load_cifar10(root, "test", transform=lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1))
    x, y = image_set.dataset[1]
    assert x.shape == (3, 32, 32) and y == 0
    np.testing.assert_array_equal(x.numpy().reshape(-1), stored["test_data"][1])


def test_cifar_fingerprint_tracks_content(cifar10_root):
    root, _ = cifar10_root
    before = load_cifar10(root, "test").identity
    assert load_cifar10(root, "test").identity == before
    path = root / "cifar-10-batches-py" / "test_batch"
    obj = pickle.loads(path.read_bytes(), encoding="bytes")
    obj[b"data"][0, 0] ^= 1
    _dump(path, obj)
    assert load_cifar10(root, "test").identity["fingerprint"] != before["fingerprint"]


def test_cifar_missing_files_error_names_path_files_and_remedy(cifar10_root, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_cifar100(tmp_path / "nowhere", "train")
    message = str(info.value)
    assert str((tmp_path / "nowhere" / "cifar-100-python").resolve()) in message
    assert "meta" in message and "cifar-100-python.tar.gz" in message and "root (data_root)" in message
    assert "--" not in message  # the library names its parameters, not the command line's flags

    root, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: data_batch_3\)"):
        load_cifar10(root, "test")


def test_cifar_download_goes_through_torchvision(cifar10_root, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, download):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="Download failed: .*no network") as info:
        load_cifar10(tmp_path / "empty", "train", download=True)
    assert "cifar-10-python.tar.gz" in str(info.value)

    source, stored = cifar10_root
    calls = []

    def fake_download(root, download):  # what torchvision leaves behind: root/cifar-10-batches-py/*
        calls.append((root, download))
        Path(root).mkdir()
        (Path(root) / "cifar-10-batches-py").symlink_to(source / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    downloaded = load_cifar10(tmp_path / "fresh", "test", download=True)
    assert calls == [(str(tmp_path / "fresh"), True)]
    np.testing.assert_array_equal(downloaded.targets, stored["test_labels"])


# --------------------------------------------------------------------------- image folders


def test_scan_class_folders_maps_names_explicitly_not_alphabetically(tmp_path):
    names = ["zebra", "apple", "mango"]
    for label, name in enumerate(names):
        for j in range(label + 1):
            _write_image(tmp_path / name / f"{j:04d}.jpg", _class_color(label))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    paths, targets = scan_class_folders(tmp_path, names)
    np.testing.assert_array_equal(targets, [0, 1, 1, 2, 2, 2])
    assert [p.parent.name for p in paths] == ["zebra", "apple", "apple", "mango", "mango", "mango"]
    with pytest.raises(ValueError, match=r"unexpected class folders \['mango'\]"):
        scan_class_folders(tmp_path, names[:2])
    with pytest.raises(FileNotFoundError, match=r"missing class folders \['kiwi'\]"):
        scan_class_folders(tmp_path, [*names, "kiwi"])


def test_cifar10_jpeg_labels_follow_cifar10_order(tmp_path):
    _write_cifar10_jpeg_tree(tmp_path / "cifar10-jpeg")
    image_set = load_cifar10_jpeg(tmp_path, "test")
    assert image_set.classes == list(CIFAR10_CLASSES) and len(image_set) == 20
    np.testing.assert_array_equal(image_set.targets, np.repeat(np.arange(10), 2))
    for i in (0, 9, 19):
        image, label = image_set.dataset[i]
        assert image.mode == "RGB" and label == image_set.targets[i]
        np.testing.assert_allclose(_mean_color(image), _class_color(label), atol=3)
    identity = image_set.identity
    assert set(identity) == IDENTITY_KEYS and identity["dataset"] == "cifar10_jpeg" and identity["num_samples"] == 20
    (tmp_path / "cifar10-jpeg" / "test" / "cat" / "0099.jpg").write_bytes(b"x")
    assert load_cifar10_jpeg(tmp_path, "test").identity["fingerprint"] != identity["fingerprint"]


def test_cifar10_jpeg_missing_error_and_extraction_from_archive(tmp_path):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10_jpeg(tmp_path / "data", "train", archive=archive)
    assert str(tmp_path / "data" / "cifar10-jpeg") in str(info.value) and "download=True" in str(info.value)

    _write_cifar10_jpeg_tree(tmp_path / "tree", per_class=1)
    with tarfile.open(archive, "w:gz") as tar:  # the shared archive has train/ and test/ at its top
        tar.add(tmp_path / "tree" / "train", arcname="train")
        tar.add(tmp_path / "tree" / "test", arcname="test")
    image_set = load_cifar10_jpeg(tmp_path / "data", "train", download=True, archive=archive)
    assert len(image_set) == 10 and (tmp_path / "data" / "cifar10-jpeg" / "test" / "truck" / "0000.jpg").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar10-jpeg"]


# --------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_labels_names_grayscale_and_val(tiny_root):
    train = load_tiny_imagenet(tiny_root, "train")
    assert train.classes == ["zebra", "goldfish, Carassius auratus", "thing"]
    np.testing.assert_array_equal(train.targets, [0, 0, 1, 1, 2, 2])
    gray, label = train.dataset[3]
    assert label == 1 and gray.mode == "RGB" and gray.size == (64, 64)
    np.testing.assert_allclose(_mean_color(gray), [200, 200, 200], atol=2)
    np.testing.assert_allclose(_mean_color(train.dataset[4][0]), _class_color(2), atol=3)

    test = load_tiny_imagenet(tiny_root, "test")
    np.testing.assert_array_equal(test.targets, [2, 0, 1, 2])
    assert [p.name for p in test.dataset.paths] == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG", "val_3.JPEG"]
    np.testing.assert_allclose(_mean_color(test.dataset[1][0]), _class_color(0), atol=3)
    assert test.identity["dataset"] == "tiny_imagenet" and test.identity["split"] == "test"
    assert test.identity["num_samples"] == 4 and test.identity["num_classes"] == 3
    annotations = tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace(f"val_0.JPEG\t{TINY_WNIDS[2]}", f"val_0.JPEG\t{TINY_WNIDS[1]}"))
    relabelled = load_tiny_imagenet(tiny_root, "test")
    assert relabelled.targets[0] == 1 and relabelled.identity["fingerprint"] != test.identity["fingerprint"]


def test_tiny_imagenet_errors(tiny_root, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_tiny_imagenet(tmp_path / "nowhere", "test", archive=tmp_path / "absent.tar.gz")
    assert str(tmp_path / "nowhere" / "tiny-imagenet-200") in str(info.value) and "val/val_annotations.txt" in str(info.value)
    annotations = tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn00000001\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="val_annotations.txt:5"):
        load_tiny_imagenet(tiny_root, "test")


def test_tiny_imagenet_extracts_local_archive(tiny_root, tmp_path):
    archive = _tar_gz(tmp_path / "tiny.tar.gz", tiny_root / "tiny-imagenet-200", "tiny-imagenet-200")
    image_set = load_tiny_imagenet(tmp_path / "data", "train", download=True, archive=archive)
    assert len(image_set) == 6 and image_set.identity["root"] == str(tmp_path / "data" / "tiny-imagenet-200")


# --------------------------------------------------------------------------- archive extraction and registry


def test_extract_archive_is_atomic(tmp_path, monkeypatch):
    (tmp_path / "src" / "top" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "top" / "sub" / "a.txt").write_text("a")
    archive = _tar_gz(tmp_path / "a.tar.gz", tmp_path / "src" / "top", "top")
    dest = tmp_path / "out" / "top"

    def interrupted(self, path, *args, **kwargs):
        (Path(path) / "top").mkdir()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tarfile.TarFile, "extractall", interrupted)
        with pytest.raises(KeyboardInterrupt):
            extract_archive(archive, dest, member_root="top")
    assert not dest.exists() and list((tmp_path / "out").iterdir()) == []

    assert extract_archive(archive, dest, member_root="top") == dest
    assert (dest / "sub" / "a.txt").read_text() == "a"
    (dest / "sub" / "a.txt").write_text("changed")
    extract_archive(archive, dest, member_root="top")  # already there: left alone
    assert (dest / "sub" / "a.txt").read_text() == "changed"
    with pytest.raises(FileNotFoundError, match="no top folder 'other'"):
        extract_archive(archive, tmp_path / "out" / "other", member_root="other")


def test_load_image_set_registry(cifar10_root):
    root, stored = cifar10_root
    assert set(IMAGE_SETS) == {"cifar10", "cifar10_jpeg", "cifar100", "tiny_imagenet"}
    assert set(DEFAULT_EXPERIENCES) == set(IMAGE_SETS)
    np.testing.assert_array_equal(load_image_set("cifar10", "test", root).targets, stored["test_labels"])
    with pytest.raises(ValueError, match="cifar10, cifar10_jpeg, cifar100, tiny_imagenet"):
        load_image_set("imagenet", "train", root)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_image_set("cifar10", "val", root)


SHARED_CIFAR10_JPEG = ARCHIVE_DIR / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not SHARED_CIFAR10_JPEG.is_file(), reason=f"{SHARED_CIFAR10_JPEG} not present")
def test_real_cifar10_jpeg_archive_members_load(tmp_path):
    """A few members of the real archive, extracted to a tiny tree, load with the right labels."""
    folder = tmp_path / "cifar10-jpeg"
    wanted = {(split, name): 2 for split in ("train", "test") for name in CIFAR10_CLASSES}
    with tarfile.open(SHARED_CIFAR10_JPEG, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and wanted.get(parts[:2], 0) > 0:
                wanted[parts[:2]] -= 1
                target = folder / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                if not any(wanted.values()):
                    break
    assert not any(wanted.values()), f"archive lacks images for {[k for k, v in wanted.items() if v]}"
    for split in ("train", "test"):
        image_set = load_cifar10_jpeg(tmp_path, split)
        np.testing.assert_array_equal(image_set.targets, np.repeat(np.arange(10), 2))
        image, label = image_set.dataset[5]
        assert image.mode == "RGB" and image.size == (32, 32) and label == 2
        assert image_set.dataset.paths[5].parent.name == "bird"


# --------------------------------------------------------------------------- streams


def _embeddings(n_classes: int, per_class: int, dim: int = 4, offset: int = 0):
    """(N, dim) inputs whose first coordinate is the sample index, (N,) labels cycling over classes."""
    n = n_classes * per_class
    x = np.zeros((n, dim), dtype=np.float32)
    x[:, 0] = np.arange(n) + offset
    return x, np.arange(n) % n_classes


def _stream_content(stream):
    return [(list(exp.classes_in_this_experience), [(int(x[0]), int(y)) for x, y, _ in exp.dataset]) for exp in stream]


def test_class_order_fixed_for_seed_0_and_seeded_otherwise():
    assert class_order_for_seed(10, 0) == list(range(10))
    order = class_order_for_seed(10, 1)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    torch.manual_seed(123)
    np.random.seed(123)
    assert class_order_for_seed(10, 1) == order  # independent of global RNG state
    assert class_order_for_seed(10, 2) != order


@pytest.mark.parametrize("seed", [0, 1])
def test_each_experience_holds_exactly_its_classes(seed):
    train_x, train_y = _embeddings(10, 6)
    test_x, test_y = _embeddings(10, 2, offset=1000)
    benchmark = make_class_incremental_benchmark(train_x, train_y, test_x, test_y, n_experiences=5, seed=seed)
    order = class_order_for_seed(10, seed)
    assert list(benchmark.classes_order) == order
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == 5
    for stream, x, y in ((benchmark.train_stream, train_x, train_y), (benchmark.test_stream, test_x, test_y)):
        for e, (classes, samples) in enumerate(_stream_content(stream)):
            assert sorted(classes) == sorted(order[2 * e : 2 * e + 2])
            index_offset = int(x[0, 0])
            assert sorted(i for i, _ in samples) == [int(v) for v in x[np.isin(y, classes), 0]]
            assert all(label == y[i - index_offset] for i, label in samples)
    assert _stream_content(benchmark.test_stream) == _stream_content(
        make_class_incremental_benchmark(train_x, train_y, test_x, test_y, n_experiences=5, seed=seed).test_stream
    )


def test_explicit_class_order_and_fifty_two_class_experiences():
    x, y = _embeddings(100, 2)
    benchmark = make_class_incremental_benchmark(x, y, x, y, n_experiences=50, seed=0)
    assert len(benchmark.train_stream) == 50
    assert [sorted(e.classes_in_this_experience) for e in benchmark.test_stream][:2] == [[0, 1], [2, 3]]
    x, y = _embeddings(4, 2)
    benchmark = make_class_incremental_benchmark(x, y, x, y, n_experiences=2, seed=7, class_order=[3, 1, 0, 2])
    assert [sorted(e.classes_in_this_experience) for e in benchmark.train_stream] == [[1, 3], [0, 2]]


def test_benchmark_input_validation():
    x, y = _embeddings(6, 2)
    with pytest.raises(ValueError, match="n_experiences=4 must divide the number of classes \\(6\\)"):
        make_class_incremental_benchmark(x, y, x, y, n_experiences=4, seed=0)
    with pytest.raises(ValueError, match=r"train: expected \(N, ...\) inputs and \(N,\) labels"):
        make_class_incremental_benchmark(x[:-1], y, x, y, n_experiences=3, seed=0)
    with pytest.raises(ValueError, match="train labels must be 0..C-1"):
        make_class_incremental_benchmark(x, y + 1, x, y, n_experiences=3, seed=0)
    with pytest.raises(ValueError, match="test labels must cover the same classes"):
        make_class_incremental_benchmark(x, y, x[y < 5], y[y < 5], n_experiences=3, seed=0)
    with pytest.raises(ValueError, match="labels must be integers"):
        make_class_incremental_benchmark(x, y.astype(np.float32), x, y, n_experiences=3, seed=0)
    with pytest.raises(ValueError, match="permutation of 0..5"):
        make_class_incremental_benchmark(x, y, x, y, n_experiences=3, seed=0, class_order=[0, 1, 2, 3, 4, 4])
