"""benchmarks.ablate on synthetic embeddings: both modes per setting, resumable, table and plot."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from benchmarks import ablate

SETTINGS = "counts,sgd K 256,counts 0.1 own-data keys,counts 0.1 top-k 4 distance-weighted"


@pytest.fixture
def fake_embeddings(monkeypatch):
    """10 Gaussian classes in 32-d instead of the cache; the key-init set is other noise."""
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))

    def embeddings(args, image_set, split, per_class):
        n = 8 if split == "train" else 4
        y = torch.arange(10).repeat_interleave(n)
        g = torch.Generator().manual_seed(hash((image_set, split)) % 1000)
        x = centres[y] + 0.5 * torch.randn(len(y), 32, generator=g)
        return SimpleNamespace(tensors=lambda: (x, y))  # stands in for a CachedEmbeddings

    monkeypatch.setattr(ablate, "load_embeddings", embeddings)


@pytest.fixture
def small_grid(monkeypatch):
    """The three settings shrunk to 8 codebooks x 16 keys (their other options unchanged)."""
    for name in SETTINGS.split(","):
        monkeypatch.setitem(ablate.GRID, name, dataclasses.replace(ablate.GRID[name], num_codebooks=8, num_keys=16))


def test_ablation_rows_resume_and_outputs(tmp_path, fake_embeddings, small_grid, capsys):
    argv = ["--settings", SETTINGS, "--out", str(tmp_path), "--epochs", "2", "--key-init-epochs", "1"]
    assert ablate.main(argv) == 0
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 4 * 2 and set(results["mode"]) == {"class_incremental", "iid"}
    assert results.final_accuracy.between(0, 1).all()
    own = results[results.setting == "counts 0.1 own-data keys"]
    assert (own.note == ablate.OWN_DATA_NOTE).all() and results[results.setting == "counts"].note.isna().all()
    summary = (tmp_path / "summary.md").read_text()
    assert "deviation" in summary and summary.count("\n") == 2 + 4
    assert (tmp_path / "ablation.png").stat().st_size > 0

    capsys.readouterr()
    assert ablate.main(argv) == 0  # resumed: nothing left to run
    assert "[class_incremental]" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings"):
        ablate.main(argv[:-2] + ["--key-init-epochs", "2"])



def test_resume_refuses_a_changed_setting_definition(tmp_path, fake_embeddings, small_grid, monkeypatch):
    argv = ["--settings", "counts", "--out", str(tmp_path), "--epochs", "2", "--key-init-epochs", "1"]
    assert ablate.main(argv) == 0
    monkeypatch.setitem(ablate.GRID, "counts", dataclasses.replace(ablate.GRID["counts"], smoothing=0.5))
    with pytest.raises(ValueError, match="another definition"):
        ablate.main(argv)


def test_unknown_setting_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        ablate.parse_args(["--settings", "sgd,bogus", "--out", str(tmp_path)])


@pytest.mark.parametrize("flags, message", [
    (["--experiences", "0"], "--experiences must be a positive integer, got 0"),  # was taken as the default 5
    (["--experiences", "3"], "--experiences must divide the number of classes of cifar10_jpeg"),
    (["--seeds", "-1"], "--seeds must be a non-empty list of non-negative integers"),
    (["--key-init-per-class", "0"], "--key-init-per-class must be a positive integer, got 0"),
    (["--image-size", "-8"], "--image-size must be a positive integer, got -8"),
])
def test_bad_flags_are_refused_before_any_embeddings_are_read(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(ablate, "load_embeddings", lambda *a: pytest.fail("embeddings read before the check"))
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--settings", "counts", "--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_experiences_default_per_data_set_is_recorded(tmp_path):
    assert ablate.parse_args(["--out", str(tmp_path)]).experiences == 5


def test_results_without_their_settings_are_refused_by_name(tmp_path, fake_embeddings, small_grid):
    """A run before settings.json was written first could leave results.csv alone: refused in one line."""
    argv = ["--settings", "counts", "--out", str(tmp_path), "--epochs", "2", "--key-init-epochs", "1"]
    assert ablate.main(argv) == 0
    (tmp_path / "settings.json").unlink()
    with pytest.raises(ValueError, match="results.csv without the settings.json"):
        ablate.main(argv)


def test_every_setting_name_can_be_selected(tmp_path):
    args = ablate.parse_args(["--settings", ",".join(ablate.GRID), "--out", str(tmp_path)])
    assert args.settings == list(ablate.GRID)


def test_key_bank_shares_keys_but_not_initial_values():
    """Two settings with the same keys: the second model gets the first one's keys, and its own values."""
    data = {"other": torch.randn(64, 12, generator=torch.Generator().manual_seed(1))}
    bank = ablate.KeyBank(12, 3, data, key_init_epochs=1)
    zeros = ablate.Setting("zeros", num_codebooks=4, num_keys=8, key_dim=2)
    normal = dataclasses.replace(zeros, name="normal", value_init="normal")
    assert normal.keys_id == zeros.keys_id
    first, _ = bank.model(zeros, seed=0)
    second, _ = bank.model(normal, seed=0)
    assert torch.equal(first.bottleneck.keys, second.bottleneck.keys) and bool(second.bottleneck.keys_frozen)
    assert torch.count_nonzero(first.bottleneck.values) == 0
    assert torch.count_nonzero(second.bottleneck.values) == second.bottleneck.values.numel()
