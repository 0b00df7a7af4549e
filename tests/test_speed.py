"""benchmarks.speed at tiny sizes: one run writes speed.json with every field numeric; the README table."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from avalanche_dkvb.data import CIFAR10_CLASSES
from benchmarks import readme, speed

NUMERIC = ("extraction_images_per_s", "extraction_eager_images_per_s", "extraction_speedup",
           "extraction_max_rel_error", "decode_images_per_s", "fast_step_ms", "generic_step_ms",
           "fast_step_speedup", "fast_step_alone_ms", "fast_step_alone_speedup", "fast_step_warm_ms", "fast_step_spread_ms",
           "fast_step_spread_gb_per_s", "memory_copy_gb_per_s", "key_init_s_per_epoch_10k",
           "key_init_setup_s_per_10k", "key_init_s_10_epochs_50k",
           "eval_s_per_10k", "eval_used_key_fraction", "search_fused_s_per_1k", "search_matmul_s_per_1k", "threads",
           "wall_clock_seconds")
TINY = ["--weights", "none", "--image-size", "32", "--extract-images", "6", "--batch-size", "3",
        "--num-workers", "0", "--experiences", "1", "--per-experience", "256", "--epochs", "2",
        "--generic-steps", "1", "--key-init-embeddings", "256", "--eval-embeddings", "64", "--embed-dim", "32",
        "--num-codebooks", "8", "--num-keys", "16", "--fast-path", "eager", "--threads", "1", "--no-progress"]


def write_cifar10_jpeg_tree(root) -> None:
    """root/cifar10-jpeg/{train,test}/<class>/0000.jpg: one random 32 x 32 colour image per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            path = root / "cifar10-jpeg" / split / name / "0000.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture(scope="module")
def tiny_speed(tmp_path_factory):
    """speed.json of one tiny run on a 20-image CIFAR-10 (JPEG) tree."""
    root = tmp_path_factory.mktemp("speed")
    write_cifar10_jpeg_tree(root / "data")
    assert speed.main(["--quick", "--out", str(root / "out"), "--data-root", str(root / "data"), *TINY]) == 0
    return json.loads((root / "out" / "speed.json").read_text())


def test_speed_json_has_every_field_numeric(tiny_speed):
    for field in NUMERIC:
        value = tiny_speed[field]
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), field
        assert value >= 0, field
    assert tiny_speed["fast_step_ms"] > 0 and tiny_speed["generic_step_ms"] > 0
    assert tiny_speed["extraction_max_rel_error"] <= 1e-4  # the default backend is exact
    assert tiny_speed["sizes"]["extract_images"] == 6 and tiny_speed["sizes"]["num_keys"] == 16
    assert tiny_speed["quick"] is True and tiny_speed["device"] == "cpu"
    assert tiny_speed["versions"]["torch"]
    assert tiny_speed["key_init_s_10_epochs_50k"] == pytest.approx(  # the projection once, then 10 epochs
        5 * (tiny_speed["key_init_setup_s_per_10k"] + 10 * tiny_speed["key_init_s_per_epoch_10k"]))
    sizes = tiny_speed["sizes"]  # each step reads its rows (one per codebook, V float32), then rewrites them
    bytes_per_step = 3 * speed.TRAIN_BATCH * sizes["num_codebooks"] * sizes["num_classes"] * 4
    assert tiny_speed["fast_step_spread_gb_per_s"] == pytest.approx(
        bytes_per_step / tiny_speed["fast_step_spread_ms"] / 1e6)
    assert tiny_speed["extraction_speedup"] == pytest.approx(
        tiny_speed["extraction_images_per_s"] / tiny_speed["extraction_eager_images_per_s"])


def test_readme_speed_table_is_rendered_from_speed_json(tiny_speed, tmp_path, monkeypatch):
    table = readme.render_speed(tiny_speed)
    assert f"{tiny_speed['extraction_images_per_s']:.1f} img/s" in table
    assert f"{tiny_speed['generic_step_ms']:.1f} ms" in table
    assert f"{tiny_speed['fast_step_spread_ms']:.3f} ms" in table
    assert f"{tiny_speed['fast_step_warm_ms']:.3f} ms" in table
    assert f"{tiny_speed['memory_copy_gb_per_s']:.1f} GB/s" in table
    assert f"{tiny_speed['search_fused_s_per_1k']:.3f} s" in table
    assert f"{tiny_speed['key_init_s_10_epochs_50k'] / 60:.1f} min" in table
    assert tiny_speed["command"] in table
    monkeypatch.chdir(tmp_path)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "speed.json").write_text(json.dumps(tiny_speed))
    (tmp_path / "README.md").write_text("a\n<!-- speed:res -->\nold\n<!-- /speed:res -->\nb\n")
    assert readme.main(tmp_path / "README.md") == 0
    assert (tmp_path / "README.md").read_text() == f"a\n<!-- speed:res -->\n{table}<!-- /speed:res -->\nb\n"


@pytest.mark.parametrize("flags, match", [
    (["--extract-images", "0"], "--extract-images"),
    (["--backend", "tensorrt"], "backend must be one of"),
    (["--device", "tpu"], "device must be"),
    (["--fast-path", "turbo"], "--fast-path must be one of"),
])
def test_bad_settings_are_one_line_errors_before_any_work(flags, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "speed.json").exists()
